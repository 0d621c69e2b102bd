"""The web app's Markdown renderer and code highlighter, run in chromium against the served modules.

Model output is untrusted: besides the rendering itself these tests check that script-bearing input
never becomes live markup, that only allowed link schemes become links, and that hostile inputs (long
delimiter runs, deep nesting) finish.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tertulia.server.app import create_app
from tertulia.server.web import STATIC
from tests.server.conftest import running

RENDER = """async ([text, options, serialize]) => {
  const { renderMarkdown } = await import("/static/js/markdown.js");
  document.querySelector("#out")?.remove();
  const box = document.createElement("div");
  box.id = "out";
  box.appendChild(renderMarkdown(text, options));
  document.body.appendChild(box);
  return serialize ? box.innerHTML : null;
}"""

HIGHLIGHT = """async ([code, lang]) => {
  const { highlight } = await import("/static/js/highlight.js");
  const box = document.createElement("div");
  box.appendChild(highlight(code, lang));
  const spans = [...box.querySelectorAll("span")].map((s) => [s.className, s.textContent]);
  const onlySpans = [...box.querySelectorAll("*")].every((e) => e.tagName === "SPAN");
  return { text: box.textContent, spans, onlySpans };
}"""

ATTRIBUTE_NAMES = "[...box.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name))"
# Every attribute the renderer may set (style: only a table cell's text-align).
ALLOWED_ATTRIBUTES = {"href", "class", "title", "type", "start", "style", "target", "rel", "data-lang"}
ALLOWED_ATTRIBUTES |= {"checked", "disabled"}  # task-list checkboxes

# The deepest element under the container, counted in elements.
MAX_DEPTH = """[...box.querySelectorAll('*')].reduce((deepest, e) => {
  let d = 0;
  for (let at = e; at !== box; at = at.parentElement) d++;
  return Math.max(deepest, d);
}, 0)"""


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with running(create_app([])) as url:
        yield url


@pytest.fixture
def md(page, server_url):
    page.goto(server_url + "/health")
    return page


def render(page, text: str, **options) -> str:
    """Render into a fresh #out container; returns its HTML."""
    return page.evaluate(RENDER, [text, options, True])


def out(page, expression: str):
    """Evaluate `expression` with `box` bound to the rendered container."""
    return page.evaluate(f"() => {{ const box = document.querySelector('#out'); return {expression}; }}")


def test_headings_and_paragraph_line_breaks(md):
    html = render(md, "# One\n## Two ##\n###### Six\n####### seven\n\nfirst line\nsecond line")
    assert html.startswith("<h1>One</h1><h2>Two</h2><h6>Six</h6>")
    assert "<p>####### seven</p>" in html
    assert "<p>first line<br>second line</p>" in html


def test_emphasis_strong_strike_and_inline_code(md):
    html = render(md, "*a* _b_ **c** __d__ ~~e~~ ***f*** `x *not* <b>` snake_case_name 2 * 3 * 4 \\*lit\\*")
    assert "<em>a</em> <em>b</em> <strong>c</strong> <strong>d</strong> <del>e</del>" in html
    assert "<em><strong>f</strong></em>" in html
    assert "<code>x *not* &lt;b&gt;</code>" in html
    assert "snake_case_name 2 * 3 * 4 *lit*" in html
    assert html.count("<em>") == 3


def test_lists_nested_ordered_and_tasks(md):
    html = render(md, "- a\n- b\n  - c\n    - d\n- e")
    assert html == "<ul><li>a</li><li>b<ul><li>c<ul><li>d</li></ul></li></ul></li><li>e</li></ul>"
    html = render(md, "3. three\n4. four\n   1. inner")
    assert html == '<ol start="3"><li>three</li><li>four<ol><li>inner</li></ol></li></ol>'
    render(md, "- [ ] todo\n- [x] done\n- plain")
    boxes = out(md, "[...box.querySelectorAll('li > input')].map((i) => [i.type, i.disabled, i.checked])")
    assert boxes == [["checkbox", True, False], ["checkbox", True, True]]
    assert out(md, "[...box.querySelectorAll('li')].map((li) => li.textContent.trim())") == [
        "todo",
        "done",
        "plain",
    ]
    assert out(md, "box.querySelectorAll('li.task-list-item').length") == 2


def test_loose_list_items_are_paragraphs(md):
    html = render(md, "1. **First**: this\n\n2. **Second**: that\n\nAfter")
    assert html == (
        "<ol><li><p><strong>First</strong>: this</p></li><li><p><strong>Second</strong>: that</p></li></ol>"
        "<p>After</p>"
    )


def test_blockquote_nested_and_hr(md):
    html = render(md, "> quoted *text*\n> > inner\n\n---\n\nafter")
    assert html == (
        "<blockquote><p>quoted <em>text</em></p><blockquote><p>inner</p></blockquote></blockquote>"
        "<hr><p>after</p>"
    )


def test_table_with_alignment(md):
    render(md, "| Name | Qty | Price |\n|:-----|:---:|------:|\n| `a\\|b` | 2 | **3** |\n| c |")
    head = out(md, "[...box.querySelectorAll('thead th')].map((c) => [c.textContent, c.style.textAlign])")
    assert head == [["Name", "left"], ["Qty", "center"], ["Price", "right"]]
    rows = out(md, "[...box.querySelectorAll('tbody tr')].map((r) => [...r.cells].map((c) => c.textContent))")
    assert rows == [["a|b", "2", "3"], ["c", "", ""]]
    assert out(md, "box.querySelector('tbody td strong').textContent") == "3"


def test_links_allowed_schemes_only(md):
    render(
        md,
        '[site](https://example.com/a_(b) "Title") <https://auto.example> see https://bare.example/x_y. '
        "[mail](mailto:me@example.com) [js](javascript:alert(1)) [data](data:text/html,hi) [rel](/local)",
    )
    links = out(
        md, "[...box.querySelectorAll('a')].map((a) => [a.getAttribute('href'), a.textContent, a.title])"
    )
    assert links == [
        ["https://example.com/a_(b)", "site", "Title"],
        ["https://auto.example/", "https://auto.example", ""],
        ["https://bare.example/x_y", "https://bare.example/x_y", ""],
        ["mailto:me@example.com", "mail", ""],
    ]
    assert out(md, "[...box.querySelectorAll('a')].every((a) => a.target === '_blank')")
    assert out(md, "[...box.querySelectorAll('a')].every((a) => a.rel === 'noopener noreferrer nofollow')")
    text = out(md, "box.textContent")
    assert "[js](javascript:alert(1))" in text
    assert "[data](data:text/html,hi)" in text
    assert "[rel](/local)" in text


def test_images_become_links_not_img(md):
    render(md, "![a cat](https://example.com/cat.png) ![bad](javascript:alert(1))")
    assert out(md, "box.querySelectorAll('img').length") == 0
    links = out(md, "[...box.querySelectorAll('a')].map((a) => [a.getAttribute('href'), a.textContent])")
    assert links == [["https://example.com/cat.png", "a cat"]]
    assert "![bad](javascript:alert(1))" in out(md, "box.textContent")


def test_fenced_code_block_structure(md):
    code = 'def greet(name):\n    # say hi\n    return f"hi {name}" < 3 & 4'
    render(md, f"Intro\n\n```python\n{code}\n```\n\nOutro", copyLabel="Copier")
    block = out(
        md,
        """(() => {
          const b = box.querySelector('div.code-block');
          const head = b.children[0], pre = b.children[1], btn = head.querySelector('button');
          return {
            children: [...b.children].map((c) => c.tagName + '.' + c.className),
            head: [...head.children].map((c) => c.tagName + '.' + c.className),
            lang: head.querySelector('.code-lang').textContent,
            button: [btn.type, btn.title, btn.textContent],
            codeClass: pre.firstElementChild.className,
            preChildren: pre.children.length,
            code: pre.querySelector('code').textContent,
          };
        })()""",
    )
    assert block == {
        "children": ["DIV.code-head", "PRE."],
        "head": ["SPAN.code-lang", "BUTTON.copy-code"],
        "lang": "python",
        "button": ["button", "Copier", "Copier"],
        "codeClass": "language-python",
        "preChildren": 1,
        "code": code,
    }
    classes = out(
        md, "[...box.querySelectorAll('pre code span')].map((s) => s.className + ':' + s.textContent)"
    )
    assert {"tok-kw:def", "tok-fn:greet", "tok-com:# say hi", "tok-kw:return", 'tok-str:f"hi {name}"'} <= set(
        classes
    )
    assert out(md, "[...box.children].map((c) => c.tagName)") == ["P", "DIV", "P"]


def test_code_block_without_language_and_default_label(md):
    render(md, "~~~\nplain *text* <b>\n~~~")
    assert out(md, "box.querySelector('.code-lang').textContent") == "text"
    assert out(md, "box.querySelector('.copy-code').textContent") == "Copy code"
    assert out(md, "box.querySelector('pre code').textContent") == "plain *text* <b>"
    assert out(md, "box.querySelectorAll('em, b').length") == 0


def test_code_language_is_sanitized(md):
    render(md, '```py"><script>x</script>abcdefghijklmnopqrstuvwxyz\nx\n```')
    lang = out(md, "box.querySelector('.code-lang').textContent")
    assert re.fullmatch(r"[A-Za-z0-9_+#.-]{1,20}", lang)
    assert lang.startswith("py")
    assert out(md, "box.querySelectorAll('script').length") == 0


def test_unclosed_fence_renders_as_code(md):
    render(md, "Here:\n\n```js\nconst x = 'streaming';\n// more to come")
    assert out(md, "box.querySelector('pre code').textContent") == "const x = 'streaming';\n// more to come"
    classes = out(md, "[...box.querySelectorAll('pre code span')].map((s) => s.className)")
    assert {"tok-kw", "tok-str", "tok-com"} <= set(classes)


def test_code_in_list_item_keeps_its_blank_lines(md):
    render(md, "1. Run:\n   ```bash\n   echo $HOME\n\n   ls\n   ```\n2. Done")
    assert out(md, "box.querySelector('ol > li .code-block pre code').textContent") == "echo $HOME\n\nls"
    assert out(md, "box.querySelector('ol').children.length") == 2
    assert out(md, "box.querySelector('.tok-var').textContent") == "$HOME"


XSS_PAYLOADS = [
    '<img src=x onerror="window.__xss=1">',
    "<script>window.__xss=1</script>",
    "[x](javascript:window.__xss=1)",
    "<svg onload=window.__xss=1>",
    "```html\n<script>window.__xss=1</script>\n```",
    '<a href="javascript:window.__xss=1">click</a>',
    "<iframe src=\"javascript:window.__xss=1\"></iframe><object data='x'></object>",
    "[x](JaVaScRiPt:window.__xss=1) [y](java\nscript:window.__xss=1) <javascript:window.__xss=1>",
    '![x](x" onerror="window.__xss=1) [a](https://x.example/" onmouseover="window.__xss=1)',
    "*<img src=x onerror=window.__xss=1>* `<img src=x onerror=window.__xss=1>`",
    "&lt;img src=x onerror=window.__xss=1&gt; &#60;script&#62;window.__xss=1&#60;/script&#62;",
    "| <img src=x onerror=window.__xss=1> |\n|---|\n| <script>window.__xss=1</script> |",
]


@pytest.mark.parametrize("payload", XSS_PAYLOADS)
def test_xss_payloads_stay_text(md, payload):
    render(md, payload)
    assert md.evaluate("() => window.__xss") is None
    assert out(md, "box.querySelectorAll('script, img, svg, iframe, object, embed, style, form').length") == 0
    attributes = set(out(md, ATTRIBUTE_NAMES))
    assert not {name for name in attributes if name.startswith("on")}
    assert attributes <= ALLOWED_ATTRIBUTES
    hrefs = out(md, "[...box.querySelectorAll('[href]')].map((e) => e.getAttribute('href'))")
    assert all(href.startswith(("https:", "http:", "mailto:")) for href in hrefs)
    text = out(md, "box.textContent")
    assert "window.__xss=1" in text


HTML_FROM_STRINGS = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser", "eval(")


def test_renderer_never_builds_html_from_strings():
    sources = sorted(STATIC.glob("js/markdown*.js")) + sorted(STATIC.glob("js/highlight*.js"))
    assert len(sources) >= 2
    allowed = {"data-lang", "start", "checked"}
    for source in sources:
        code = source.read_text()
        for forbidden in HTML_FROM_STRINGS:
            assert forbidden not in code, f"{source.name} uses {forbidden}"
        assert set(re.findall(r"setAttribute\(\"([^\"]+)\"", code)) <= allowed, source.name
        assert "setAttribute(" not in re.sub(r"setAttribute\(\"(data-lang|start|checked)\"", "", code)


ADVERSARIAL = {
    "stars": "*" * 100_000,
    "star-words": "*a" * 50_000,
    "underscores": "_a" * 50_000,
    "brackets": "[" * 100_000,
    "bang-brackets": "![" * 50_000,
    "closing-brackets": "]" * 100_000,
    "open-links": "[a](" * 25_000,
    "open-titles": "[a](x (" * 14_000,
    "backticks": "`" * 100_000,
    "backticks-mid-line": "a" + "`" * 100_000,
    "backtick-runs": "``a`" * 25_000,
    "quotes": ">" * 100_000,
    "quote-lines": ">\n" * 50_000,
    "nested-lists": "".join("  " * i + "- x\n" for i in range(300)),
    "ordered-markers": "1. " * 33_000,
    "emphasis-nest": "*" * 50_000 + "a" + "*" * 50_000,
    "mixed-delimiters": "*_" * 50_000,
    "autolinks": "<https://" * 11_000,
    "urls": "https://" * 12_000,
    "bad-urls": "https://[" * 11_000,
    "bad-www": "www.[" * 20_000,
    "entities": "&#" * 50_000,
    "backslashes": "\\" * 100_000,
    "fences": "```\n" * 25_000,
    "table": "|a|b|\n|-|-|\n" + "|x|y|\n" * 15_000,
    "code-strings": "```js\n" + '"\\"' * 30_000 + "\n```",
    "code-markup": "```html\n" + "<a b='" * 10_000 + "<script>" * 1_000 + "\n```",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_input_finishes(md, name):
    md.evaluate(RENDER, [ADVERSARIAL[name], {}, False])
    assert out(md, "box.childNodes.length") > 0
    assert out(md, MAX_DEPTH) <= 50


def test_deep_quote_nesting_is_capped(md):
    render(md, ">" * 100_000 + " end")
    assert 10 <= out(md, "box.querySelectorAll('blockquote').length") <= 21
    assert out(md, "box.textContent").endswith("end")


HIGHLIGHT_SAMPLES = [
    (
        "python",
        'def f(x: int) -> str:\n    """Doc."""\n    return "a" + str(x)  # note\n',
        {"tok-kw", "tok-str", "tok-com", "tok-fn"},
    ),
    ("py", "@dataclass\nclass P:\n    x = 0x1F\n", {"tok-fn", "tok-kw", "tok-num"}),
    (
        "javascript",
        "// c\nconst s = `t${x}`;\nasync function go() { return await f('/x'); }\n",
        {"tok-kw", "tok-str", "tok-com"},
    ),
    ("js", "/* open comment\nlet x = 1", {"tok-com"}),
    (
        "ts",
        "interface U { id: number }\nconst u: U = { id: 1 }; // c\n",
        {"tok-kw", "tok-type", "tok-num", "tok-com"},
    ),
    (
        "json",
        '{\n  "name": "x",\n  "n": -1.5e3, "ok": true, "v": null\n}',
        {"tok-key", "tok-str", "tok-num", "tok-kw"},
    ),
    (
        "bash",
        '# c\nexport P="$HOME/bin"\nfor f in *.txt; do echo "${f}" $1; done\n',
        {"tok-com", "tok-kw", "tok-str", "tok-var"},
    ),
    (
        "c",
        '#include <stdio.h>\nint main(void) { printf("%d\\n", 1); /* c */ return 0; }\n',
        {"tok-kw", "tok-type", "tok-str", "tok-fn"},
    ),
    ("cpp", "template <typename T>\nclass S { std::vector<T> v; };\n", {"tok-kw", "tok-type"}),
    (
        "java",
        '@Override\npublic String name() { return "x"; }\n',
        {"tok-type", "tok-kw", "tok-str", "tok-fn"},
    ),
    (
        "go",
        'package main\nfunc main() { s := `raw`; fmt.Println("hi", nil) }\n',
        {"tok-kw", "tok-str", "tok-fn"},
    ),
    (
        "rust",
        "fn main() {\n    let v: Vec<u8> = vec![1];\n    println!(\"{}\", 'c');\n}\n",
        {"tok-kw", "tok-type", "tok-fn", "tok-str"},
    ),
    (
        "sql",
        "-- q\nSELECT id FROM t WHERE name = 'O''Brien' LIMIT 10;\n",
        {"tok-com", "tok-kw", "tok-str", "tok-num"},
    ),
    (
        "html",
        '<!-- c -->\n<div class="a">Hi &amp; bye</div>\n<script>const a = "x";</script>\n',
        {"tok-com", "tok-tag", "tok-attr", "tok-str", "tok-kw"},
    ),
    (
        "css",
        "/* c */\n.card { color: #fff; width: calc(100% - 2px); }\n",
        {"tok-com", "tok-tag", "tok-attr", "tok-num", "tok-fn"},
    ),
    (
        "yaml",
        "# c\nname: app\nitems:\n  - key: 'v'\n    on: true\n",
        {"tok-com", "tok-key", "tok-str", "tok-kw"},
    ),
    ("", 'output: "quoted" it\'s 42 # note\n', {"tok-str", "tok-num", "tok-com"}),
    ("no-such-language", "x = 'a' // c\n\ttabs\r\n and unicode é 🙂", {"tok-str", "tok-com"}),
]


@pytest.mark.parametrize(
    ("lang", "code", "expected"), HIGHLIGHT_SAMPLES, ids=[s[0] or "empty" for s in HIGHLIGHT_SAMPLES]
)
def test_highlight_round_trip(md, lang, code, expected):
    result = md.evaluate(HIGHLIGHT, [code, lang])
    assert result["text"] == code
    assert result["onlySpans"]
    assert expected <= {cls for cls, _ in result["spans"]}
    assert all(cls.startswith("tok-") and text for cls, text in result["spans"])


def test_highlight_keywords_and_strings_by_token(md):
    spans = md.evaluate(HIGHLIGHT, ["if x:\n    print('hi')  # done", "python"])["spans"]
    assert ["tok-kw", "if"] in spans
    assert ["tok-fn", "print"] in spans
    assert ["tok-str", "'hi'"] in spans
    assert ["tok-com", "# done"] in spans
