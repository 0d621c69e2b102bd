"""A long conversation opens and scrolls smoothly: 500 messages rendered, timed in the page.

The figures are printed (and recorded in BENCHMARKS.md), not asserted: machines here are noisy.
What is asserted is that every message is there and the scroll reaches the end.
"""

from __future__ import annotations

import statistics

import pytest

from tests.e2e.conftest import export_of
from tests.e2e.test_web_chat import open_site

pytestmark = pytest.mark.slow

MESSAGES = 500
OPENINGS = 5

ANSWER = """Answer {i}: use **slicing** or `reversed()`, as in the [docs](https://docs.python.org/3/):

```python
items = [1, 2, 3]
print(items[::-1])  # [3, 2, 1]
```

| way | copies |
|-----|--------|
| `items[::-1]` | yes |
| `reversed(items)` | no |

- slicing makes a new list
- `reversed` gives an iterator
"""

# Scroll from top to bottom in steps of one screen, one step per animation frame; report frame gaps.
SCROLL = """async () => {
  const box = document.querySelector('#messages');
  box.scrollTop = 0;
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const gaps = [];
  let last = performance.now();
  while (box.scrollTop + box.clientHeight < box.scrollHeight - 2) {
    box.scrollTop += box.clientHeight;
    await new Promise((r) => requestAnimationFrame(r));
    const now = performance.now();
    gaps.push(now - last);
    last = now;
  }
  gaps.sort((a, b) => a - b);
  return {frames: gaps.length, median: gaps[Math.floor(gaps.length / 2)],
          p95: gaps[Math.floor(gaps.length * 0.95)], max: gaps[gaps.length - 1],
          atEnd: box.scrollTop + box.clientHeight >= box.scrollHeight - 2};
}"""


def long_conversation() -> dict:
    turns = []
    for i in range(MESSAGES // 2):
        turns.append(("user", f"Question {i}: how do I reverse a list in Python?"))
        turns.append(("assistant", ANSWER.format(i=i)))
    return export_of(*turns, title="A long conversation")


def test_a_conversation_of_500_messages_opens_and_scrolls_smoothly(page, web, capsys) -> None:
    cid = web.import_conversation(long_conversation())
    renders, loads = [], []
    for _ in range(OPENINGS):
        open_site(page, web, f"/c/{cid}")
        page.wait_for_function(f"() => document.body.dataset.rendered === '{MESSAGES}'")
        renders.append(page.evaluate("() => window.tertulia.stats.renderMs"))
        loads.append(page.evaluate("() => performance.now()"))
    assert page.locator("#messages .message").count() == MESSAGES
    assert page.locator("#messages .code-block").count() == MESSAGES // 2
    scroll = page.evaluate(SCROLL)
    assert scroll["atEnd"] and scroll["frames"] > 5
    with capsys.disabled():
        print(
            f"\n500 messages: render median {statistics.median(renders):.0f} ms "
            f"(min {min(renders):.0f}, max {max(renders):.0f}, {OPENINGS} openings); "
            f"page ready after {statistics.median(loads):.0f} ms; scroll of {scroll['frames']} screens: "
            f"frame gap median {scroll['median']:.1f} ms, p95 {scroll['p95']:.1f} ms, "
            f"max {scroll['max']:.1f} ms"
        )
