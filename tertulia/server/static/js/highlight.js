// Syntax highlighting for fenced code blocks. One left-to-right pass per language with a single
// combined regex, building text nodes and <span class="tok-…"> elements (never an HTML string), so the
// code's text comes out exactly as it went in. String and comment rules match even when left unclosed
// (to the end of the line or text), so no rule fails after a long scan that the next position repeats:
// linear time on any input, including a reply cut off mid-string while it streams.

const words = (list) => new Set(list.split(" "));

const NUM = String.raw`(?:0[xX][\da-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?)[A-Za-z]*`;
const DQ = String.raw`"(?:[^"\\\n]|\\[\s\S])*"?`;
const SQ = String.raw`'(?:[^'\\\n]|\\[\s\S])*'?`;
const BQ = String.raw`\`(?:[^\`\\]|\\[\s\S])*\`?`;
const SLASH_COMMENTS = String.raw`//[^\n]*|/\*[\s\S]*?(?:\*/|$)`;
const IDENT = String.raw`[A-Za-z_$][\w$]*`;
const LINE_START = String.raw`(?:^|(?<=\n))`;
// The lookbehind runs only at a "<", so long runs of spaces are not rescanned at every position.
const INCLUDE = String.raw`<(?<=#[ \t]*include[ \t]*<)[^>\n]*>`;

const JS_KW =
  "break case catch class const continue debugger default delete do else export extends finally for function if " +
  "import in instanceof let new return super switch this throw try typeof var void while with yield async await of " +
  "static get set true false null undefined NaN Infinity from as";
const JS_TYPES = "Array Object String Number Boolean Promise Map Set WeakMap WeakSet Date RegExp Error JSON Math Symbol BigInt";
const C_KW =
  "auto break case const continue default do else enum extern for goto if inline register restrict return signed " +
  "sizeof static struct switch typedef union unsigned volatile while NULL true false";
const C_TYPES =
  "void char short int long float double bool _Bool size_t ssize_t ptrdiff_t intptr_t uintptr_t int8_t int16_t " +
  "int32_t int64_t uint8_t uint16_t uint32_t uint64_t FILE wchar_t";
const CPP_KW =
  " alignas alignof asm catch class concept constexpr consteval constinit const_cast co_await co_return co_yield " +
  "decltype delete dynamic_cast explicit export final friend mutable namespace new noexcept nullptr operator override " +
  "private protected public reinterpret_cast requires static_assert static_cast template this thread_local throw try " +
  "typeid typename using virtual";
const CPP_TYPES =
  " string wstring string_view vector map unordered_map set unordered_set array unique_ptr shared_ptr optional std";

// An identifier: keyword, builtin type, called function, declared name, or (typed languages) a class name.
function ident(word, code, end, state, spec) {
  const prev = state.prev;
  state.prev = word;
  const key = spec.fold ? word.toLowerCase() : word;
  if (spec.kw.has(key)) return "tok-kw";
  if (spec.types.has(key)) return "tok-type";
  if (code.charCodeAt(end) === 40 || spec.declFn.has(prev)) return "tok-fn";
  if (spec.declType.has(prev)) return "tok-type";
  if (spec.caps && /^[A-Z]\w*[a-z]/.test(word)) return "tok-type";
  return null;
}

// A quoted string followed by a colon is a key (JSON, YAML).
function keyOrString(text, code, end) {
  let i = end;
  while (code[i] === " " || code[i] === "\t") i++;
  return code[i] === ":" ? "tok-key" : "tok-str";
}

// A YAML mapping key at the start of a line; its indentation and "- " stay plain.
function yamlKey(text) {
  const lead = /^[ \t]*(?:-[ \t]+)*/.exec(text)[0].length;
  return [[text.slice(0, lead), null], [text.slice(lead), "tok-key"]];
}

// CSS: a word is a selector outside braces, a property (before ':') or a value inside them.
function cssWord(word, code, end, state) {
  if (state.depth === 0) return word[0] === ":" ? null : "tok-tag";
  if (word[0] === "#") return "tok-num";
  let i = end;
  while (code[i] === " " || code[i] === "\t") i++;
  if (code[i] === ":") return "tok-attr";
  if (code[i] === "(") return "tok-fn";
  return null;
}

function cssBrace(text, code, end, state) {
  state.depth = Math.max(0, state.depth + (text === "{" ? 1 : -1));
  return null;
}

const cFamily = (kw, types, extra, options = {}) => ({
  rules: [...extra, ["tok-com", SLASH_COMMENTS], ["tok-str", `${DQ}|${SQ}`], ["tok-num", NUM], [ident, IDENT]],
  kw: words(kw),
  types: words(types),
  caps: true,
  ...options,
});

const SPECS = {
  python: () => ({
    rules: [
      ["tok-com", String.raw`#[^\n]*`],
      ["tok-str", String.raw`(?:[rRbBuUfF]{1,2})?(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|${DQ}|${SQ})`],
      ["tok-fn", String.raw`@[A-Za-z_][\w.]*`],
      ["tok-num", NUM],
      [ident, String.raw`[A-Za-z_]\w*`],
    ],
    kw: words(
      "and as assert async await break class continue def del elif else except finally for from global if import in is " +
        "lambda nonlocal not or pass raise return try while with yield match case None True False self",
    ),
    types: words("int float str bool list dict set tuple bytes bytearray object type frozenset complex range Exception"),
    declFn: words("def"),
    declType: words("class"),
  }),
  js: () => ({
    rules: [["tok-com", SLASH_COMMENTS], ["tok-str", `${DQ}|${SQ}|${BQ}`], ["tok-num", NUM], [ident, IDENT]],
    kw: words(JS_KW),
    types: words(JS_TYPES),
    declFn: words("function"),
    declType: words("class extends new"),
  }),
  ts: () => ({
    rules: [
      ["tok-com", SLASH_COMMENTS],
      ["tok-str", `${DQ}|${SQ}|${BQ}`],
      ["tok-fn", String.raw`@[A-Za-z_]\w*`],
      ["tok-num", NUM],
      [ident, IDENT],
    ],
    kw: words(
      `${JS_KW} interface type enum implements private public protected readonly abstract declare namespace keyof ` +
        "infer is satisfies module",
    ),
    types: words(`${JS_TYPES} string number boolean any unknown never object symbol bigint`),
    declFn: words("function"),
    declType: words("class interface type enum extends implements new"),
    caps: true,
  }),
  json: () => ({
    rules: [
      ["tok-com", SLASH_COMMENTS],
      [keyOrString, DQ],
      ["tok-num", String.raw`-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?`],
      [ident, IDENT],
    ],
    kw: words("true false null"),
  }),
  yaml: () => ({
    rules: [
      ["tok-com", String.raw`(?<!\S)#[^\n]*`],
      [yamlKey, String.raw`${LINE_START}[ \t]*(?:-[ \t]+)*[^\s:#'"\[\]{},&*!|>%@\`-][^:\n#]*(?=:(?:[ \t]|\n|$))`],
      [keyOrString, String.raw`"(?:[^"\\\n]|\\.)*"?|'(?:[^'\n]|'')*'?`],
      ["tok-kw", String.raw`${LINE_START}(?:---|\.\.\.)(?=\s|$)`],
      ["tok-num", NUM],
      [ident, String.raw`[A-Za-z_~][\w.-]*`],
    ],
    kw: words("true false null yes no on off True False Null ~"),
  }),
  bash: () => ({
    rules: [
      ["tok-com", String.raw`(?<!\S)#[^\n]*`],
      ["tok-var", String.raw`\$\{[^}\n]*\}?|\$[A-Za-z_]\w*|\$[0-9@#?*!$-]`],
      ["tok-str", String.raw`"(?:[^"\\]|\\[\s\S])*"?|'[^']*'?`],
      ["tok-num", String.raw`(?<![\w.-])\d+(?:\.\d+)?(?![\w.])`],
      [ident, String.raw`[A-Za-z_][\w-]*`],
    ],
    kw: words(
      "if then else elif fi for while until do done case esac in function select return exit local export readonly " +
        "declare unset shift break continue time",
    ),
    types: words(
      "echo printf cd pwd read source alias set test eval exec trap sudo cat grep sed awk ls mkdir rm cp mv chmod " +
        "curl git pip python npm make apt apt-get docker",
    ),
  }),
  c: () => cFamily(C_KW, C_TYPES, [
    ["tok-str", INCLUDE],
    ["tok-kw", String.raw`${LINE_START}[ \t]*#[ \t]*[A-Za-z]+`],
  ]),
  cpp: () => cFamily(C_KW + CPP_KW, C_TYPES + CPP_TYPES, [
    ["tok-str", INCLUDE],
    ["tok-kw", String.raw`${LINE_START}[ \t]*#[ \t]*[A-Za-z]+`],
  ], { declType: words("class struct enum namespace") }),
  java: () => cFamily(
    "abstract assert break case catch class const continue default do else enum extends final finally for goto if " +
      "implements import instanceof interface native new package private protected public return static strictfp " +
      "super switch synchronized this throw throws transient try volatile while var record yield sealed permits true " +
      "false null",
    "boolean byte char double float int long short void",
    [["tok-type", String.raw`@[A-Za-z_]\w*`]],
  ),
  go: () => cFamily(
    "break case chan const continue default defer else fallthrough for func go goto if import interface map package " +
      "range return select struct switch type var true false nil iota",
    "bool byte complex64 complex128 error float32 float64 int int8 int16 int32 int64 rune string uint uint8 uint16 " +
      "uint32 uint64 uintptr any",
    [["tok-str", BQ]],
    { declType: words("type") },
  ),
  rust: () => cFamily(
    "as async await break const continue crate dyn else enum extern false fn for if impl in let loop match mod move " +
      "mut pub ref return self Self static struct super trait true type unsafe use where while union macro_rules",
    "bool char f32 f64 i8 i16 i32 i64 i128 isize str u8 u16 u32 u64 u128 usize",
    [
      ["tok-type", String.raw`#!?\[[^\]\n]*\]?`],
      ["tok-str", String.raw`b?r#"[\s\S]*?(?:"#|$)|b?r"[^"]*"?|b?"(?:[^"\\]|\\[\s\S])*"?|b?'(?:\\[^\n]{1,10}?|[^'\\\n])'`],
      ["tok-type", String.raw`'[A-Za-z_]\w*`],
      ["tok-fn", String.raw`[A-Za-z_]\w*!(?=[(\[{])`],
    ],
    { declFn: words("fn"), declType: words("struct enum trait impl type") },
  ),
  sql: () => ({
    rules: [
      ["tok-com", String.raw`--[^\n]*|/\*[\s\S]*?(?:\*/|$)`],
      ["tok-str", String.raw`'(?:[^']|'')*'?`],
      ["tok-num", NUM],
      [ident, String.raw`[A-Za-z_][\w$]*`],
    ],
    kw: words(
      "select from where and or not insert into values update set delete create table drop alter add column primary " +
        "key foreign references index on join left right inner outer full cross group by order having limit offset as " +
        "distinct union all exists in is null like ilike between case when then else end begin commit rollback " +
        "transaction with returning default unique check constraint if view trigger asc desc true false cascade " +
        "database schema grant revoke over partition",
    ),
    types: words(
      "int integer bigint smallint text varchar char boolean bool date time timestamp timestamptz float real double " +
        "numeric decimal serial bigserial uuid json jsonb blob",
    ),
    fold: true,
  }),
  css: () => ({
    rules: [
      ["tok-com", String.raw`/\*[\s\S]*?(?:\*/|$)`],
      ["tok-str", `${DQ}|${SQ}`],
      ["tok-kw", String.raw`@[\w-]+|!important`],
      [cssBrace, "[{}]"],
      ["tok-num", String.raw`#[\da-fA-F]{3,8}(?![\w-])|-?(?:\d+\.?\d*|\.\d+)(?:%|[A-Za-z]+)?`],
      [cssWord, String.raw`(?:[#.:]{1,2})?-?[A-Za-z_][\w-]*`],
    ],
  }),
  generic: () => ({
    rules: [
      ["tok-com", String.raw`(?<!\S)(?:#|//)[^\n]*|/\*[\s\S]*?(?:\*/|$)`],
      ["tok-str", String.raw`${DQ}|(?<!\w)'[^'\n]*'(?!\w)`],
      ["tok-num", String.raw`(?<![\w.])${NUM}`],
      [ident, String.raw`[A-Za-z_]\w*`],
    ],
  }),
};

const ALIASES = {
  py: "python", python3: "python", javascript: "js", jsx: "js", mjs: "js", cjs: "js", node: "js",
  typescript: "ts", tsx: "ts", jsonc: "json", json5: "json", sh: "bash", shell: "bash", zsh: "bash",
  console: "bash", shellsession: "bash", "c++": "cpp", cc: "cpp", cxx: "cpp", h: "cpp", hpp: "cpp",
  golang: "go", rs: "rust", yml: "yaml", xml: "html", svg: "html", htm: "html", xhtml: "html",
};

const EMPTY = new Set();
const compiled = new Map();

// Each language's rules become one regex of alternatives; the group that matched names the rule.
function compile(name) {
  let spec = compiled.get(name);
  if (!spec) {
    const raw = SPECS[name]();
    spec = {
      kw: EMPTY, types: EMPTY, declFn: EMPTY, declType: EMPTY, ...raw,
      re: new RegExp(raw.rules.map(([, source]) => `(${source})`).join("|"), "g"),
      kinds: raw.rules.map(([kind]) => kind),
    };
    compiled.set(name, spec);
  }
  return spec;
}

function span(cls, text) {
  const node = document.createElement("span");
  node.className = cls;
  node.textContent = text;
  return node;
}

function plain(out, code, from, to) {
  if (to > from) out.appendChild(document.createTextNode(code.slice(from, to)));
}

function tokenize(spec, code, out) {
  const { re, kinds } = spec;
  const state = { prev: "", depth: 0 };
  let from = 0;
  let match;
  re.lastIndex = 0;
  while ((match = re.exec(code)) !== null) {
    const text = match[0];
    if (text === "") {
      re.lastIndex++;
      continue;
    }
    let group = 1;
    while (match[group] === undefined) group++;
    const kind = kinds[group - 1];
    if (kind !== ident) state.prev = "";
    const cls = typeof kind === "function" ? kind(text, code, re.lastIndex, state, spec) : kind;
    if (!cls) continue;
    plain(out, code, from, match.index);
    if (Array.isArray(cls)) {
      for (const [part, partCls] of cls) {
        if (part) out.appendChild(partCls ? span(partCls, part) : document.createTextNode(part));
      }
    } else out.appendChild(span(cls, text));
    from = re.lastIndex;
  }
  plain(out, code, from, code.length);
}

const MARKUP = /<!--[\s\S]*?(?:-->|$)|<!\[CDATA\[[\s\S]*?(?:\]\]>|$)|<[!?][^>]*>?|<\/?[A-Za-z][\w:.-]*|&(?:#\d+|#[xX][\da-fA-F]+|[A-Za-z]\w*);/g;
// Inside a tag every character matches one of these, so the sticky scan never stalls.
const IN_TAG = /\s+|\/?>|"[^"]*"?|'[^']*'?|=|[^\s=>"'/]+|\//y;
const EMBEDDED = { script: "js", style: "css" };

// HTML/XML: tags and attributes; <script> and <style> bodies go to the JS and CSS highlighters.
function markup(code, out) {
  let from = 0;
  let match;
  MARKUP.lastIndex = 0;
  while ((match = MARKUP.exec(code)) !== null) {
    const text = match[0];
    plain(out, code, from, match.index);
    from = MARKUP.lastIndex;
    if (text[0] === "&") out.appendChild(span("tok-kw", text));
    else if (text.startsWith("<!--")) out.appendChild(span("tok-com", text));
    else if (text.startsWith("<![CDATA[")) out.appendChild(span("tok-str", text));
    else if (text[1] === "!" || text[1] === "?") out.appendChild(span("tok-kw", text));
    else {
      out.appendChild(span("tok-tag", text));
      let closed = "";
      IN_TAG.lastIndex = from;
      let part;
      while (from < code.length && (part = IN_TAG.exec(code)) !== null) {
        const piece = part[0];
        from = IN_TAG.lastIndex;
        if (piece.endsWith(">")) {
          out.appendChild(span("tok-tag", piece));
          closed = piece;
          break;
        }
        if (piece[0] === '"' || piece[0] === "'") out.appendChild(span("tok-str", piece));
        else if (/^[\s=/]/.test(piece)) out.appendChild(document.createTextNode(piece));
        else out.appendChild(span("tok-attr", piece));
      }
      const embedded = closed === ">" && text[1] !== "/" && EMBEDDED[text.slice(1).toLowerCase()];
      if (embedded) {
        const end = new RegExp(`</${text.slice(1)}`, "ig");
        end.lastIndex = from;
        const found = end.exec(code);
        const stop = found ? found.index : code.length;
        out.appendChild(highlight(code.slice(from, stop), embedded));
        from = stop;
      }
      MARKUP.lastIndex = from;
    }
  }
  plain(out, code, from, code.length);
}

/** Highlight `code` as `lang` (name or alias, any case; unknown or empty: a generic pass). */
export function highlight(code, lang) {
  const out = document.createDocumentFragment();
  const text = String(code ?? "");
  let name = String(lang ?? "").toLowerCase();
  name = ALIASES[name] || name;
  if (name === "html") markup(text, out);
  else tokenize(compile(Object.hasOwn(SPECS, name) ? name : "generic"), text, out);
  return out;
}
