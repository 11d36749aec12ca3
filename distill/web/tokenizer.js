// CLIP byte-level BPE tokenizer for the browser and node: a port of distill/tokenizer_np.py
// (itself open_clip's SimpleTokenizer) that gives the same ids, checked against a fixture that
// tokenizer_np.py writes (tools/tokenizer_fixture.py, tests/test_js_tokenizer.py).
//
// Plain ES module: no build step, no dependency. Usage, with an edge bundle's tokenizer/ folder
// (bpe_simple_vocab_16e6.txt.gz + tokenizer.json, as distill/export.py writes it):
//
//   import { loadTokenizer } from "./tokenizer.js";
//   const tok = await loadTokenizer("bundle/tokenizer/");  // browser: fetch() relative to the page
//   // or, in node: await loadTokenizer((name) => fs.readFile(path.join(dir, name)).catch(() => null))
//   tok.tokenize(["a photo of a cat."]);       // number[][]: B rows of context_length ids
//   tok.tokenizeInt64(["a photo of a cat."]);  // { data: BigInt64Array, dims: [B, L] } for onnxruntime
//
// Node before 20.19 takes a .js file for CommonJS unless a package.json next to it says
// "type": "module" (tests/js/tokenizer.test.mjs imports it through a data: URL instead).
//
// The text cleaning is the one tokenizer_np.py applies when ftfy and regex are installed (as they
// are wherever open_clip is): ftfy 6.3.1's fix_text (mojibake repair, HTML entities, ligatures,
// widths, quotes, line breaks, surrogates, terminal escapes, control characters, NFC), Python's
// html.unescape twice (as of 3.11), whitespace collapse, lower case, and the `regex` split pattern
// with IGNORECASE. Character properties (letters, numbers, case, NFC) come from the JS engine's
// Unicode version; Python takes them from its own, so characters assigned in between may differ.

export const VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz";
export const CONFIG_FILE = "tokenizer.json";
export const DEFAULT_CONTEXT_LENGTH = 77;
const SPECIAL_TOKENS = ["<start_of_text>", "<end_of_text>"];
const N_MERGES = 49152 - 256 - 2; // merges lines 1..48894 of the vocabulary file, as in open_clip

// Python's str.isspace() set (str.split/strip), and the `regex` module's \s (Unicode White_Space).
const PY_SPACE = "\\t\\n\\x0b\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const REGEX_SPACE = "\\t\\n\\x0b\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const PY_SPACE_RUN = new RegExp(`[${PY_SPACE}]+`, "u");

// ------------------------------------------------------------------------------ loading

/** Gunzip bytes: DecompressionStream where the runtime has it (browsers, node >= 18), else node's zlib. */
export async function gunzip(bytes) {
  if (typeof DecompressionStream === "function") {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  const zlib = await import("node:zlib");
  return new Uint8Array(zlib.gunzipSync(bytes));
}

async function toBytes(data) {
  if (data == null) return null;
  if (typeof data === "string") return new TextEncoder().encode(data);
  if (typeof Response !== "undefined" && data instanceof Response) return new Uint8Array(await data.arrayBuffer());
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("read() must resolve to bytes, a string, a Response or null");
}

function fetchReader(base) {
  // a relative folder resolves against the page, as a link would
  const folder = new URL(base, globalThis.location?.href);
  return async (name) => {
    const res = await fetch(new URL(name, folder));
    if (res.status === 404) return null;
    if (!res.ok) throw new Error(`fetching ${res.url}: HTTP ${res.status}`);
    return res;
  };
}

/**
 * Load a tokenizer from a bundle's tokenizer/ folder, like NumpyTokenizer.from_dir.
 *
 * @param source a base URL of the folder (read with fetch; end it with "/"), or a function
 *   read(fileName) resolving to its bytes / text / Response, or null when the file is absent.
 * @param options.contextLength overrides tokenizer.json's context_length.
 */
export async function loadTokenizer(source, { contextLength } = {}) {
  const read = typeof source === "function" ? source : fetchReader(String(source));
  const cfgBytes = await toBytes(await read(CONFIG_FILE));
  const cfg = cfgBytes ? JSON.parse(new TextDecoder().decode(cfgBytes)) : {};
  const vocabName = cfg.vocab_file ?? VOCAB_FILE;
  let vocab = await toBytes(await read(vocabName));
  if (vocab == null) throw new Error(`${vocabName} not found in the tokenizer folder`);
  // gzip magic number: a server may already have decoded the .gz (Content-Encoding: gzip)
  if (vocab[0] === 0x1f && vocab[1] === 0x8b) vocab = await gunzip(vocab);
  return new ClipTokenizer(new TextDecoder().decode(vocab), {
    contextLength: contextLength ?? Number(cfg.context_length ?? DEFAULT_CONTEXT_LENGTH),
  });
}

// ------------------------------------------------------------------------------ tokenizer

let byteEncoderTable = null;

/** GPT-2/CLIP's reversible byte -> printable character table, in open_clip's order. */
export function bytesToUnicode() {
  if (byteEncoderTable) return byteEncoderTable;
  const bs = [];
  const range = (a, b) => { for (let c = a; c <= b; c++) bs.push(c); };
  range(0x21, 0x7e);
  range(0xa1, 0xac);
  range(0xae, 0xff);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n += 1;
    }
  }
  const byByte = new Array(256);
  bs.forEach((b, i) => { byByte[b] = String.fromCharCode(cs[i]); });
  byteEncoderTable = { order: bs.map((b) => byByte[b]), byByte };
  return byteEncoderTable;
}

// <start_of_text>, <end_of_text> and the contractions, matched like `regex` with IGNORECASE: ASCII
// letters in either case, and s also as U+017F (long s), the only other case variants here.
function ignoreCase(literal) {
  return literal.replace(/[a-z]/g, (c) => `[${c}${c.toUpperCase()}${c === "s" ? "\u017f" : ""}]`);
}

const SPLIT_PATTERN = new RegExp(
  [...SPECIAL_TOKENS, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"].map(ignoreCase).join("|") +
    // `regex` with IGNORECASE matches U+0345 (a combining mark that case-folds to iota) with no
    // class, so tokenizer_np drops it; the last class leaves it out to do the same.
    `|[\\p{L}]+|[\\p{N}]|[^${REGEX_SPACE}\\p{L}\\p{N}\\u0345]+`,
  "gu",
);

function pythonSplit(text) {
  return text.split(PY_SPACE_RUN).filter((s) => s.length > 0);
}

/** tokenizer_np.clean_text: ftfy fix_text, html.unescape twice, whitespace collapse, lower case. */
export function cleanText(text) {
  const unescaped = htmlUnescape(htmlUnescape(fixText(text)));
  return pythonSplit(unescaped).join(" ").toLowerCase();
}

export class ClipTokenizer {
  /**
   * @param mergesText the decompressed bpe_simple_vocab_16e6.txt (a header line, then merges).
   * @param options.contextLength L, the fixed output length.
   */
  constructor(mergesText, { contextLength = DEFAULT_CONTEXT_LENGTH } = {}) {
    const { order, byByte } = bytesToUnicode();
    this.byteEncoder = byByte;
    const merges = mergesText.split("\n").slice(1, N_MERGES + 1).map(pythonSplit);
    const vocab = [...order, ...order.map((v) => v + "</w>"), ...merges.map((m) => m.join("")), ...SPECIAL_TOKENS];
    this.encoder = new Map();
    vocab.forEach((t, i) => this.encoder.set(t, i));
    // Pair keys joined by a space: no BPE symbol contains one (byte 0x20 is encoded as U+0120).
    this.bpeRanks = new Map();
    merges.forEach((m, i) => this.bpeRanks.set(m.join(" "), i));
    this.cache = new Map(SPECIAL_TOKENS.map((t) => [t, t]));
    this.sotTokenId = this.encoder.get(SPECIAL_TOKENS[0]);
    this.eotTokenId = this.encoder.get(SPECIAL_TOKENS[1]);
    this.vocabSize = this.encoder.size;
    this.contextLength = Math.trunc(Number(contextLength));
  }

  /** One byte-encoded pre-token -> space-separated BPE symbols (open_clip's merge loop). */
  bpe(token) {
    const cached = this.cache.get(token);
    if (cached !== undefined) return cached;
    const chars = Array.from(token);
    let word = [...chars.slice(0, -1), chars[chars.length - 1] + "</w>"];
    if (word.length < 2) return token + "</w>";
    for (;;) {
      let best = null;
      let bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const rank = this.bpeRanks.get(word[i] + " " + word[i + 1]);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          best = i;
        }
      }
      if (best === null) break;
      const first = word[best];
      const second = word[best + 1];
      const next = [];
      let i = 0;
      while (i < word.length) {
        const j = word.indexOf(first, i);
        if (j < 0) {
          next.push(...word.slice(i));
          break;
        }
        next.push(...word.slice(i, j));
        i = j;
        if (i < word.length - 1 && word[i + 1] === second) {
          next.push(first + second);
          i += 2;
        } else {
          next.push(word[i]);
          i += 1;
        }
      }
      word = next;
      if (word.length === 1) break;
    }
    const out = word.join(" ");
    this.cache.set(token, out);
    return out;
  }

  /** One string -> BPE ids without <start_of_text>/<end_of_text>. */
  encode(text) {
    const ids = [];
    const utf8 = new TextEncoder();
    for (const [token] of cleanText(text).matchAll(SPLIT_PATTERN)) {
      let encoded = "";
      for (const b of utf8.encode(token)) encoded += this.byteEncoder[b];
      for (const symbol of this.bpe(encoded).split(" ")) {
        const id = this.encoder.get(symbol);
        if (id === undefined) throw new Error(`BPE symbol ${JSON.stringify(symbol)} is not in the vocabulary`);
        ids.push(id);
      }
    }
    return ids;
  }

  /** B strings -> B rows of L ids: sot, tokens, eot, zeros; truncated with eot kept last. */
  tokenize(texts, contextLength = undefined) {
    const list = typeof texts === "string" ? [texts] : Array.from(texts);
    const length = Math.trunc(Number(contextLength || this.contextLength));
    return list.map((text) => {
      let ids = [this.sotTokenId, ...this.encode(text), this.eotTokenId];
      if (ids.length > length) {
        ids = ids.slice(0, length);
        ids[ids.length - 1] = this.eotTokenId;
      }
      const row = new Array(length).fill(0);
      ids.forEach((id, i) => { row[i] = id; });
      return row;
    });
  }

  /** tokenize() as one int64 tensor body: { data: BigInt64Array (B * L), dims: [B, L] }. */
  tokenizeInt64(texts, contextLength = undefined) {
    const rows = this.tokenize(texts, contextLength);
    const length = rows.length ? rows[0].length : Math.trunc(Number(contextLength || this.contextLength));
    const data = new BigInt64Array(rows.length * length);
    rows.forEach((row, r) => row.forEach((id, c) => { data[r * length + c] = BigInt(id); }));
    return { data, dims: [rows.length, length] };
  }
}

// ------------------------------------------------------------------------------ html.unescape

let html5Map = null;
let invalidCharrefMap = null;

function html5() {
  if (!html5Map) {
    html5Map = new Map();
    for (const entry of HTML5_ENTITIES) {
      const eq = entry.indexOf("=");
      const value = entry.slice(eq + 1);
      for (const name of entry.slice(0, eq).split(" ")) html5Map.set(name, value);
    }
    invalidCharrefMap = new Map(Object.entries(INVALID_CHARREFS).map(([k, v]) => [Number(k), v]));
  }
  return html5Map;
}

function isInvalidCodepoint(num) {
  return INVALID_CODEPOINTS.some(([a, b]) => num >= a && num <= b);
}

function replaceCharref(s) {
  const entities = html5();
  if (s[0] === "#") {
    const hex = s[1] === "x" || s[1] === "X";
    const digits = s.slice(hex ? 2 : 1).replace(/;$/, "");
    const num = parseInt(digits, hex ? 16 : 10); // huge values lose precision but stay > 0x10FFFF
    if (invalidCharrefMap.has(num)) return invalidCharrefMap.get(num);
    if ((num >= 0xd800 && num <= 0xdfff) || num > 0x10ffff) return "\ufffd";
    if (isInvalidCodepoint(num)) return "";
    return String.fromCodePoint(num);
  }
  if (entities.has(s)) return entities.get(s);
  // the longest known prefix (the legacy names without ';'), counted in code points like Python
  const cps = Array.from(s);
  for (let x = cps.length - 1; x > 1; x--) {
    const prefix = cps.slice(0, x).join("");
    if (entities.has(prefix)) return entities.get(prefix) + cps.slice(x).join("");
  }
  return "&" + s;
}

const CHARREF_RE = /&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)/gu;

/** Python 3.11's html.unescape (HTML5 named and numeric character references). */
export function htmlUnescape(s) {
  if (!s.includes("&")) return s;
  return s.replace(CHARREF_RE, (_, ref) => replaceCharref(ref));
}

// ------------------------------------------------------------------------------ ftfy.fix_text

// Byte strings are handled as "binary" JS strings, one char per byte (0-255), so that ftfy's
// bytes regexes translate to JS regexes without the u flag.

const CHARMAP_ENCODINGS = [
  "latin-1", "sloppy-windows-1252", "sloppy-windows-1251", "sloppy-windows-1250", "sloppy-windows-1253",
  "sloppy-windows-1254", "sloppy-windows-1257", "iso-8859-2", "macroman", "cp437",
];
const MAX_DECODE_LENGTH = 1000000;
const CP1252_UNDEFINED = new Set([0x81, 0x8d, 0x8f, 0x90, 0x9d]);

let codecTable = null;

function codecs() {
  if (codecTable) return codecTable;
  codecTable = new Map();
  const ascii = Array.from({ length: 128 }, (_, i) => String.fromCharCode(i));
  const latin1 = Array.from({ length: 128 }, (_, i) => String.fromCharCode(0x80 + i)).join("");
  for (const [name, high] of [["latin-1", latin1], ...Object.entries(CODEC_HIGH)]) {
    const decode = [...ascii, ...high];
    if (name.startsWith("sloppy-")) decode[0x1a] = "\ufffd"; // ftfy's stand-in byte for U+FFFD
    codecTable.set(name, { decode, encode: new Map(decode.map((ch, b) => [ch, b])) });
  }
  return codecTable;
}

/** str.encode(encoding) as a binary string, or null where a character has no byte (chardata.possible_encoding). */
function encodeCharmap(text, encoding) {
  const { encode } = codecs().get(encoding);
  let out = "";
  for (const ch of text) {
    const b = encode.get(ch);
    if (b === undefined) return null;
    out += String.fromCharCode(b);
  }
  return out;
}

function binaryToBytes(binary) {
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// Python's strict UTF-8 decoder; ignoreBOM keeps a leading U+FEFF as Python does.
const UTF8_STRICT = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

function decodeUtf8(binary) {
  return UTF8_STRICT.decode(binaryToBytes(binary));
}

/** ftfy's "utf-8-variants" codec: UTF-8 plus CESU-8 surrogate pairs and Java's C0 80 for U+0000. */
function decodeUtf8Variants(binary) {
  const n = binary.length;
  const at = (i) => binary.charCodeAt(i);
  // Python's bytes-regex `$`: the end, or just before a final newline
  const isEnd = (i) => i === n || (i === n - 1 && at(i) === 0x0a);
  const inRange = (i, lo, hi) => i < n && at(i) >= lo && at(i) <= hi;
  // ftfy's SPECIAL_BYTES_RE: NULL_EXPR | CESU8_EXPR | SURROGATE_EXPR (CESU-8 starts are a subset of the last)
  const isSpecialStart = (i) => {
    if (at(i) === 0xc0) return inRange(i + 1, 0x80, 0x80) || isEnd(i + 1);
    if (at(i) !== 0xed) return false;
    return (inRange(i + 1, 0xa0, 0xbf) && (inRange(i + 2, 0x80, 0xbf) || isEnd(i + 2))) || isEnd(i + 1);
  };
  // CESU8_RE.match at i (at least 6 bytes remain, so only the last element can match `$`)
  const isCesu8 = (i) =>
    at(i) === 0xed && inRange(i + 1, 0xa0, 0xaf) && inRange(i + 2, 0x80, 0xbf) && at(i + 3) === 0xed &&
    inRange(i + 4, 0xb0, 0xbf) && (inRange(i + 5, 0x80, 0xbf) || isEnd(i + 5));
  let out = "";
  let pos = 0;
  while (pos < n) {
    let start = pos;
    while (start < n && !isSpecialStart(start)) start++;
    if (start > pos) {
      out += decodeUtf8(binary.slice(pos, start));
      pos = start;
      continue;
    }
    if (at(pos) === 0xc0) {
      if (n - pos < 2) decodeUtf8(binary.slice(pos)); // throws, as the strict decoder does
      out += "\u0000";
      pos += 2;
    } else if (n - pos >= 6 && isCesu8(pos)) {
      const cp = ((at(pos + 1) & 0x0f) << 16) + ((at(pos + 2) & 0x3f) << 10) + ((at(pos + 4) & 0x0f) << 6) +
        (at(pos + 5) & 0x3f) + 0x10000;
      out += String.fromCodePoint(cp);
      pos += 6;
    } else {
      throw new TypeError("invalid utf-8-variants sequence"); // an unpaired surrogate's bytes
    }
  }
  return out;
}

function decodeCp1252Strict(binary) {
  const sloppy = codecs().get("sloppy-windows-1252").decode;
  let out = "";
  for (let i = 0; i < binary.length; i++) {
    const b = binary.charCodeAt(i);
    if (CP1252_UNDEFINED.has(b)) throw new TypeError("byte undefined in windows-1252");
    out += b >= 0x80 ? sloppy[b] : binary[i]; // the strict codec keeps byte 0x1A as U+001A
  }
  return out;
}

// ftfy.badness.BADNESS_RE, with Python's \s, \w and . spelled out (JS's differ).
let badnessRe = null;

function badness() {
  if (badnessRe) return badnessRe;
  const { c1, bad, law, currency, numeric, kaomoji, box, common } = MOJIBAKE;
  const sp = MOJIBAKE.start_punctuation;
  const ep = MOJIBAKE.end_punctuation;
  const la = MOJIBAKE.lower_accented;
  const ua = MOJIBAKE.upper_accented;
  const lc = MOJIBAKE.lower_common;
  const uc = MOJIBAKE.upper_common;
  const arabic = `${common}${currency}${bad}${numeric}${sp}\u0178\u0160\u00ae\u00b0\u00b5\u00bb`;
  const alternatives = [
    `[${c1}]`,
    `[${bad}${la}${ua}${box}${sp}${ep}${currency}${numeric}${law}][${bad}]`,
    `[a-zA-Z][${lc}${uc}][${bad}]`,
    `[${bad}][${la}${ua}${box}${sp}${ep}${currency}${numeric}${law}]`,
    `[${la}${lc}${box}${ep}${currency}${numeric}][${ua}]`,
    `[${box}${ep}${currency}${numeric}][${la}]`,
    `[${la}${box}${ep}][${currency}]`,
    `[${PY_SPACE}][${ua}][${currency}]`,
    `[${ua}${box}][${numeric}${law}]`,
    `[${la}${ua}${box}${currency}${ep}][${sp}][${numeric}]`,
    `[${la}${ua}${currency}${numeric}${box}${law}][${ep}][${sp}]`,
    `[${currency}${numeric}${box}][${sp}]`,
    `[a-z][${ua}][${sp}${currency}]`,
    `[${box}][${kaomoji}]`,
    `[${la}${ua}${currency}${numeric}${sp}${ep}${law}][${box}]`,
    `[${box}][${ep}]`,
    `[${la}${ua}][${sp}${ep}][\\p{L}\\p{N}_]`,
    "[\u0152\u0153][^A-Za-z]",
    `[${ua}]\u00b0`,
    `[\u00c2\u00c3\u00ce\u00d0][\u20ac\u0153\u0160\u0161\u00a2\u00a3\u0178\u017e\u00a0\u00ad\u00ae\u00a9\u00b0\u00b7\u00bb` +
      `${sp}${ep}\u2013\u2014\u00b4]`,
    "\u00d7[\u00b2\u00b3]",
    `[\u00d8\u00d9][${arabic}][\u00d8\u00d9][${arabic}]`,
    "\u00e0[\u00b2\u00b5\u00b9\u00bc\u00bd\u00be]",
    "\u221a[\u00b1\u2202\u2020\u2260\u00ae\u2122\u00b4\u2264\u2265\u00a5\u00b5\u00f8]",
    "\u2248[\u00b0\u00a2]",
    "\u201a\u00c4[\u00ec\u00ee\u00ef\u00f2\u00f4\u00fa\u00f9\u00fb\u2020\u00b0\u00a2\u03c0]",
    "\u201a[\u00e2\u00f3][\u00e0\u00e4\u00b0\u00ea]",
    "\u0432\u0402",
    `[\u0412\u0413\u0420\u0421][${c1}${bad}${sp}${ep}${currency}\u00b0\u00b5][\u0412\u0413\u0420\u0421]`,
    "\u0413\u045e\u0412\u0402\u0412[^\\n][A-Za-z ]",
    "\u00c3[\u00a0\u00a1]",
    `[a-z][${PY_SPACE}]?[\u00c3\u00c2][ ]`,
    "^[\u00c3\u00c2][ ]",
    `[a-z.,?!${ep}]\u00c2[ ${sp}${ep}]`,
    "\u03b2\u20ac[\u2122\u00a0\u0386\u00ad\u00ae\u00b0]",
    `[\u0392\u0393\u039e\u039f][${c1}${bad}${sp}${ep}${currency}\u00b0][\u0392\u0393\u039e\u039f]`,
    "\u0101\u20ac",
  ];
  badnessRe = new RegExp(alternatives.join("|"), "u");
  return badnessRe;
}

function isBad(text) {
  return badness().test(text);
}

let utf8DetectorRe = null;

// ftfy.chardata.UTF8_DETECTOR_RE
function utf8Detector() {
  if (!utf8DetectorRe) {
    const U = UTF8_CLUES;
    utf8DetectorRe = new RegExp(
      `(?<![${U.utf8_continuation_strict}])(?:[${U.utf8_first_of_2}][${U.utf8_continuation}]` +
        `|[${U.utf8_first_of_3}][${U.utf8_continuation}]{2}|[${U.utf8_first_of_4}][${U.utf8_continuation}]{3})+`,
      "gu",
    );
  }
  return utf8DetectorRe;
}

// ftfy.chardata's bytes regexes, on binary strings
const ALTERED_UTF8_RE = new RegExp(
  [
    "[\\xc2\\xc3\\xc5\\xce\\xd0\\xd9][ ]",
    "[\\xe2\\xe3][ ][\\x80-\\x84\\x86-\\x9f\\xa1-\\xbf]",
    "[\\xe0-\\xe3][\\x80-\\x84\\x86-\\x9f\\xa1-\\xbf][ ]",
    "[\\xf0][ ][\\x80-\\xbf][\\x80-\\xbf]",
    "[\\xf0][\\x80-\\xbf][ ][\\x80-\\xbf]",
    "[\\xf0][\\x80-\\xbf][\\x80-\\xbf][ ]",
  ].join("|"),
  "g",
);
const A_GRAVE_WORD_RE = /\xc3 (?! |quele|quela|quilo|s )/g;
const LOSSY_UTF8_RE = new RegExp(
  [
    "[\\xc2-\\xdf][\\x1a]",
    "[\\xc2-\\xc3][?]",
    "\\xed[\\xa0-\\xaf][\\x1a?]\\xed[\\xb0-\\xbf][\\x1a?\\x80-\\xbf]",
    "\\xed[\\xa0-\\xaf][\\x1a?\\x80-\\xbf]\\xed[\\xb0-\\xbf][\\x1a?]",
    "[\\xe0-\\xef][\\x1a?][\\x1a\\x80-\\xbf]",
    "[\\xe0-\\xef][\\x1a\\x80-\\xbf][\\x1a?]",
    "[\\xf0-\\xf4][\\x1a?][\\x1a\\x80-\\xbf][\\x1a\\x80-\\xbf]",
    "[\\xf0-\\xf4][\\x1a\\x80-\\xbf][\\x1a?][\\x1a\\x80-\\xbf]",
    "[\\xf0-\\xf4][\\x1a\\x80-\\xbf][\\x1a\\x80-\\xbf][\\x1a?]",
    "\\x1a",
  ].join("|"),
  "g",
);
const C1_CONTROL_RE = /[\x80-\x9f]/g;

function restoreByteA0(binary) {
  const fixed = binary.replace(A_GRAVE_WORD_RE, "\xc3\xa0 ");
  return fixed.replace(ALTERED_UTF8_RE, (m) => m.replaceAll(" ", "\xa0"));
}

function fixC1Controls(text) {
  const table = codecs().get("sloppy-windows-1252").decode;
  return text.replace(C1_CONTROL_RE, (ch) => table[ch.charCodeAt(0)]);
}

function decodeInconsistentUtf8(text) {
  return text.replace(utf8Detector(), (m) => (m.length < text.length && isBad(m) ? fixEncoding(m) : m));
}

// ftfy._fix_encoding_one_step_and_explain (the explanation dropped)
function fixEncodingOneStep(text) {
  if (text.length === 0 || /^[\x00-\x7f]*$/.test(text) || !isBad(text)) return text;
  const possible = [];
  for (const encoding of CHARMAP_ENCODINGS) {
    let bytes = encodeCharmap(text, encoding);
    if (bytes === null) continue;
    possible.push(encoding);
    if (encoding !== "macroman" && bytes.search(ALTERED_UTF8_RE) !== -1) bytes = restoreByteA0(bytes);
    if (encoding.startsWith("sloppy")) bytes = bytes.replace(LOSSY_UTF8_RE, "\xef\xbf\xbd");
    try {
      return bytes.includes("\xed") || bytes.includes("\xc0") ? decodeUtf8Variants(bytes) : decodeUtf8(bytes);
    } catch {
      // not UTF-8 after all: try the next encoding
    }
  }
  if (text.search(utf8Detector()) !== -1) {
    const fixed = decodeInconsistentUtf8(text);
    if (fixed !== text) return fixed;
  }
  // ftfy checks for "windows-1252" among the sloppy names, which never matches: latin-1 text is
  // always retried as windows-1252.
  if (possible.includes("latin-1")) {
    try {
      const fixed = decodeCp1252Strict(encodeCharmap(text, "latin-1"));
      if (fixed !== text) return fixed;
    } catch {
      // an undefined windows-1252 byte: leave it to fix_c1_controls
    }
  }
  if (/[\x80-\x9f]/.test(text)) return fixC1Controls(text);
  return text;
}

function fixEncoding(text) {
  for (;;) {
    const previous = text;
    text = fixEncodingOneStep(text);
    if (text === previous) return text;
  }
}

const HTML_ENTITY_RE = /&#?[0-9A-Za-z]{1,24};/g;
let ftfyEntities = null;

// ftfy.chardata.HTML_ENTITIES: the ';' names, plus all-caps forms of the lower-case ones that
// html.unescape would not decode (e.g. &EACUTE; -> É).
function ftfyHtmlEntities() {
  if (ftfyEntities) return ftfyEntities;
  ftfyEntities = new Map();
  for (const [name, char] of html5()) {
    if (!name.endsWith(";")) continue;
    ftfyEntities.set("&" + name, char);
    if (name === name.toLowerCase()) {
      const upper = "&" + name.toUpperCase();
      if (htmlUnescape(upper) === upper) ftfyEntities.set(upper, char.toUpperCase());
    }
  }
  return ftfyEntities;
}

function ftfyUnescapeHtml(text) {
  return text.replace(HTML_ENTITY_RE, (m) => {
    const entities = ftfyHtmlEntities();
    if (entities.has(m)) return entities.get(m);
    if (m.startsWith("&#")) {
      const unescaped = htmlUnescape(m);
      return unescaped.includes(";") ? m : unescaped;
    }
    return m;
  });
}

let widthMap = null;

// ftfy.chardata.WIDTH_MAP: U+3000 and the NFKC forms of U+FF01-U+FFEF
function fixCharacterWidth(text) {
  if (!widthMap) {
    widthMap = new Map([["\u3000", " "]]);
    for (let cp = 0xff01; cp < 0xfff0; cp++) {
      const ch = String.fromCharCode(cp);
      const alt = ch.normalize("NFKC");
      if (alt !== ch) widthMap.set(ch, alt);
    }
  }
  return text.replace(/[\u3000\uff01-\uffef]/g, (ch) => widthMap.get(ch) ?? ch);
}

let ligatureRe = null;

function fixLatinLigatures(text) {
  ligatureRe ??= new RegExp(`[${Object.keys(LIGATURES).join("")}]`, "g");
  return text.replace(ligatureRe, (ch) => LIGATURES[ch]);
}

function uncurlQuotes(text) {
  return text.replace(/[\u201c-\u201f]/g, '"').replace(/[\u02bc\u2018-\u201b]/g, "'");
}

function fixLineBreaks(text) {
  return text.replaceAll("\r\n", "\n").replaceAll("\r", "\n").replaceAll("\u2028", "\n")
    .replaceAll("\u2029", "\n").replaceAll("\u0085", "\n");
}

// Python holds a surrogate pair as one code point already (JSON and UTF-8 both pair them), so
// only unpaired surrogates are left to replace.
function fixSurrogates(text) {
  return text.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, "\ufffd");
}

function removeTerminalEscapes(text) {
  return text.replace(/\x1b\[((?:\p{Nd}|;)*)([a-zA-Z])/gu, "");
}

function removeControlChars(text) {
  return text.replace(/[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]/g, "");
}

// ftfy.fix_and_explain with the default TextFixerConfig, on one segment
function fixSegment(text, unescapeHtml) {
  const unescape = unescapeHtml && !text.includes("<");
  for (;;) {
    const original = text;
    if (unescape) text = ftfyUnescapeHtml(text);
    text = fixEncoding(text);
    text = fixC1Controls(text);
    text = fixLatinLigatures(text);
    text = fixCharacterWidth(text);
    text = uncurlQuotes(text);
    text = fixLineBreaks(text);
    text = fixSurrogates(text);
    text = removeTerminalEscapes(text);
    text = removeControlChars(text);
    text = text.normalize("NFC");
    if (text === original) return text;
  }
}

/** ftfy.fix_text with its defaults: fixed line by line (and at most 10^6 code points at a time). */
export function fixText(text) {
  const out = [];
  // like ftfy, a '<' in one segment turns HTML unescaping off for the rest of the text
  let unescapeHtml = true;
  let pos = 0;
  while (pos < text.length) {
    let end = text.indexOf("\n", pos) + 1 || text.length;
    if (end - pos > MAX_DECODE_LENGTH) {
      let i = pos;
      for (let n = 0; n < MAX_DECODE_LENGTH && i < end; n++) i += text.codePointAt(i) > 0xffff ? 2 : 1;
      end = i;
    }
    const segment = text.slice(pos, end);
    if (segment.includes("<")) unescapeHtml = false;
    out.push(fixSegment(segment, unescapeHtml));
    pos = end;
  }
  return out.join("");
}

// ------------------------------------------------------------------------------ data
// Python's html.entities.html5 (the WHATWG named references), as "name name2=value" strings.
const HTML5_ENTITIES = [
  "Aacute Aacute;=\u00c1", "aacute aacute;=\u00e1", "Abreve;=\u0102", "abreve;=\u0103", "ac; mstpos;=\u223e",
  "acd;=\u223f", "acE;=\u223e\u0333", "Acirc Acirc;=\u00c2", "acirc acirc;=\u00e2",
  "acute acute; DiacriticalAcute;=\u00b4", "Acy;=\u0410", "acy;=\u0430", "AElig AElig;=\u00c6",
  "aelig aelig;=\u00e6", "af; ApplyFunction;=\u2061", "Afr;=\ud835\udd04", "afr;=\ud835\udd1e",
  "Agrave Agrave;=\u00c0", "agrave agrave;=\u00e0", "alefsym; aleph;=\u2135", "Alpha;=\u0391",
  "alpha;=\u03b1", "Amacr;=\u0100", "amacr;=\u0101", "amalg;=\u2a3f", "AMP amp AMP; amp;=&", "And;=\u2a53",
  "and; wedge;=\u2227", "andand;=\u2a55", "andd;=\u2a5c", "andslope;=\u2a58", "andv;=\u2a5a",
  "ang; angle;=\u2220", "ange;=\u29a4", "angmsd; measuredangle;=\u2221", "angmsdaa;=\u29a8",
  "angmsdab;=\u29a9", "angmsdac;=\u29aa", "angmsdad;=\u29ab", "angmsdae;=\u29ac", "angmsdaf;=\u29ad",
  "angmsdag;=\u29ae", "angmsdah;=\u29af", "angrt;=\u221f", "angrtvb;=\u22be", "angrtvbd;=\u299d",
  "angsph;=\u2222", "angst; Aring Aring;=\u00c5", "angzarr;=\u237c", "Aogon;=\u0104", "aogon;=\u0105",
  "Aopf;=\ud835\udd38", "aopf;=\ud835\udd52", "ap; approx; asymp; thickapprox; thkap; TildeTilde;=\u2248",
  "apacir;=\u2a6f", "apE;=\u2a70", "ape; approxeq;=\u224a", "apid;=\u224b", "apos;='", "aring aring;=\u00e5",
  "Ascr;=\ud835\udc9c", "ascr;=\ud835\udcb6", "Assign; colone; coloneq;=\u2254", "ast; midast;=*",
  "asympeq; CupCap;=\u224d", "Atilde Atilde;=\u00c3", "atilde atilde;=\u00e3", "Auml Auml;=\u00c4",
  "auml auml;=\u00e4", "awconint; CounterClockwiseContourIntegral;=\u2233", "awint;=\u2a11",
  "backcong; bcong;=\u224c", "backepsilon; bepsi;=\u03f6", "backprime; bprime;=\u2035",
  "backsim; bsim;=\u223d", "backsimeq; bsime;=\u22cd",
  "Backslash; setminus; setmn; smallsetminus; ssetmn;=\u2216", "Barv;=\u2ae7", "barvee;=\u22bd",
  "Barwed; doublebarwedge;=\u2306", "barwed; barwedge;=\u2305", "bbrk; UnderBracket;=\u23b5",
  "bbrktbrk;=\u23b6", "Bcy;=\u0411", "bcy;=\u0431", "bdquo; ldquor;=\u201e",
  "becaus; Because; because;=\u2235", "bemptyv;=\u29b0", "bernou; Bernoullis; Bscr;=\u212c", "Beta;=\u0392",
  "beta;=\u03b2", "beth;=\u2136", "between; twixt;=\u226c", "Bfr;=\ud835\udd05", "bfr;=\ud835\udd1f",
  "bigcap; Intersection; xcap;=\u22c2", "bigcirc; xcirc;=\u25ef", "bigcup; Union; xcup;=\u22c3",
  "bigodot; xodot;=\u2a00", "bigoplus; xoplus;=\u2a01", "bigotimes; xotime;=\u2a02",
  "bigsqcup; xsqcup;=\u2a06", "bigstar; starf;=\u2605", "bigtriangledown; xdtri;=\u25bd",
  "bigtriangleup; xutri;=\u25b3", "biguplus; xuplus;=\u2a04", "bigvee; Vee; xvee;=\u22c1",
  "bigwedge; Wedge; xwedge;=\u22c0", "bkarow; rbarr;=\u290d", "blacklozenge; lozf;=\u29eb",
  "blacksquare; FilledVerySmallSquare; squarf; squf;=\u25aa", "blacktriangle; utrif;=\u25b4",
  "blacktriangledown; dtrif;=\u25be", "blacktriangleleft; ltrif;=\u25c2",
  "blacktriangleright; rtrif;=\u25b8", "blank;=\u2423", "blk12;=\u2592", "blk14;=\u2591", "blk34;=\u2593",
  "block;=\u2588", "bne;==\u20e5", "bnequiv;=\u2261\u20e5", "bNot;=\u2aed", "bnot;=\u2310",
  "Bopf;=\ud835\udd39", "bopf;=\ud835\udd53", "bot; bottom; perp; UpTee;=\u22a5", "bowtie;=\u22c8",
  "boxbox;=\u29c9", "boxDL;=\u2557", "boxDl;=\u2556", "boxdL;=\u2555", "boxdl;=\u2510", "boxDR;=\u2554",
  "boxDr;=\u2553", "boxdR;=\u2552", "boxdr;=\u250c", "boxH;=\u2550", "boxh; HorizontalLine;=\u2500",
  "boxHD;=\u2566", "boxHd;=\u2564", "boxhD;=\u2565", "boxhd;=\u252c", "boxHU;=\u2569", "boxHu;=\u2567",
  "boxhU;=\u2568", "boxhu;=\u2534", "boxminus; minusb;=\u229f", "boxplus; plusb;=\u229e",
  "boxtimes; timesb;=\u22a0", "boxUL;=\u255d", "boxUl;=\u255c", "boxuL;=\u255b", "boxul;=\u2518",
  "boxUR;=\u255a", "boxUr;=\u2559", "boxuR;=\u2558", "boxur;=\u2514", "boxV;=\u2551", "boxv;=\u2502",
  "boxVH;=\u256c", "boxVh;=\u256b", "boxvH;=\u256a", "boxvh;=\u253c", "boxVL;=\u2563", "boxVl;=\u2562",
  "boxvL;=\u2561", "boxvl;=\u2524", "boxVR;=\u2560", "boxVr;=\u255f", "boxvR;=\u255e", "boxvr;=\u251c",
  "Breve; breve;=\u02d8", "brvbar brvbar;=\u00a6", "bscr;=\ud835\udcb7", "bsemi;=\u204f", "bsol;=\\",
  "bsolb;=\u29c5", "bsolhsub;=\u27c8", "bull; bullet;=\u2022", "bump; Bumpeq; HumpDownHump;=\u224e",
  "bumpE;=\u2aae", "bumpe; bumpeq; HumpEqual;=\u224f", "Cacute;=\u0106", "cacute;=\u0107", "Cap;=\u22d2",
  "cap;=\u2229", "capand;=\u2a44", "capbrcup;=\u2a49", "capcap;=\u2a4b", "capcup;=\u2a47", "capdot;=\u2a40",
  "CapitalDifferentialD; DD;=\u2145", "caps;=\u2229\ufe00", "caret;=\u2041", "caron; Hacek;=\u02c7",
  "Cayleys; Cfr;=\u212d", "ccaps;=\u2a4d", "Ccaron;=\u010c", "ccaron;=\u010d", "Ccedil Ccedil;=\u00c7",
  "ccedil ccedil;=\u00e7", "Ccirc;=\u0108", "ccirc;=\u0109", "Cconint;=\u2230", "ccups;=\u2a4c",
  "ccupssm;=\u2a50", "Cdot;=\u010a", "cdot;=\u010b", "cedil cedil; Cedilla;=\u00b8", "cemptyv;=\u29b2",
  "cent cent;=\u00a2", "CenterDot; centerdot; middot middot;=\u00b7", "cfr;=\ud835\udd20", "CHcy;=\u0427",
  "chcy;=\u0447", "check; checkmark;=\u2713", "Chi;=\u03a7", "chi;=\u03c7", "cir;=\u25cb", "circ;=\u02c6",
  "circeq; cire;=\u2257", "circlearrowleft; olarr;=\u21ba", "circlearrowright; orarr;=\u21bb",
  "circledast; oast;=\u229b", "circledcirc; ocir;=\u229a", "circleddash; odash;=\u229d",
  "CircleDot; odot;=\u2299", "circledR; REG reg REG; reg;=\u00ae", "circledS; oS;=\u24c8",
  "CircleMinus; ominus;=\u2296", "CirclePlus; oplus;=\u2295", "CircleTimes; otimes;=\u2297", "cirE;=\u29c3",
  "cirfnint;=\u2a10", "cirmid;=\u2aef", "cirscir;=\u29c2", "ClockwiseContourIntegral; cwconint;=\u2232",
  "CloseCurlyDoubleQuote; rdquo; rdquor;=\u201d", "CloseCurlyQuote; rsquo; rsquor;=\u2019",
  "clubs; clubsuit;=\u2663", "Colon; Proportion;=\u2237", "colon;=:", "Colone;=\u2a74", "comma;=,",
  "commat;=@", "comp; complement;=\u2201", "compfn; SmallCircle;=\u2218", "complexes; Copf;=\u2102",
  "cong; TildeFullEqual;=\u2245", "congdot;=\u2a6d", "Congruent; equiv;=\u2261",
  "Conint; DoubleContourIntegral;=\u222f", "conint; ContourIntegral; oint;=\u222e", "copf;=\ud835\udd54",
  "coprod; Coproduct;=\u2210", "COPY copy COPY; copy;=\u00a9", "copysr;=\u2117", "crarr;=\u21b5",
  "Cross;=\u2a2f", "cross;=\u2717", "Cscr;=\ud835\udc9e", "cscr;=\ud835\udcb8", "csub;=\u2acf",
  "csube;=\u2ad1", "csup;=\u2ad0", "csupe;=\u2ad2", "ctdot;=\u22ef", "cudarrl;=\u2938", "cudarrr;=\u2935",
  "cuepr; curlyeqprec;=\u22de", "cuesc; curlyeqsucc;=\u22df", "cularr; curvearrowleft;=\u21b6",
  "cularrp;=\u293d", "Cup;=\u22d3", "cup;=\u222a", "cupbrcap;=\u2a48", "cupcap;=\u2a46", "cupcup;=\u2a4a",
  "cupdot;=\u228d", "cupor;=\u2a45", "cups;=\u222a\ufe00", "curarr; curvearrowright;=\u21b7",
  "curarrm;=\u293c", "curlyvee; cuvee;=\u22ce", "curlywedge; cuwed;=\u22cf", "curren curren;=\u00a4",
  "cwint;=\u2231", "cylcty;=\u232d", "Dagger; ddagger;=\u2021", "dagger;=\u2020", "daleth;=\u2138",
  "Darr;=\u21a1", "dArr; DoubleDownArrow; Downarrow;=\u21d3",
  "darr; DownArrow; downarrow; ShortDownArrow;=\u2193", "dash; hyphen;=\u2010",
  "Dashv; DoubleLeftTee;=\u2ae4", "dashv; LeftTee;=\u22a3", "dbkarow; rBarr;=\u290f",
  "dblac; DiacriticalDoubleAcute;=\u02dd", "Dcaron;=\u010e", "dcaron;=\u010f", "Dcy;=\u0414", "dcy;=\u0434",
  "dd; DifferentialD;=\u2146", "ddarr; downdownarrows;=\u21ca", "DDotrahd;=\u2911", "ddotseq; eDDot;=\u2a77",
  "deg deg;=\u00b0", "Del; nabla;=\u2207", "Delta;=\u0394", "delta;=\u03b4", "demptyv;=\u29b1",
  "dfisht;=\u297f", "Dfr;=\ud835\udd07", "dfr;=\ud835\udd21", "dHar;=\u2965",
  "dharl; downharpoonleft; LeftDownVector;=\u21c3", "dharr; downharpoonright; RightDownVector;=\u21c2",
  "DiacriticalDot; dot;=\u02d9", "DiacriticalGrave; grave;=`", "DiacriticalTilde; tilde;=\u02dc",
  "diam; Diamond; diamond;=\u22c4", "diamondsuit; diams;=\u2666", "die; Dot; DoubleDot; uml uml;=\u00a8",
  "digamma; gammad;=\u03dd", "disin;=\u22f2", "div; divide divide;=\u00f7", "divideontimes; divonx;=\u22c7",
  "DJcy;=\u0402", "djcy;=\u0452", "dlcorn; llcorner;=\u231e", "dlcrop;=\u230d", "dollar;=$",
  "Dopf;=\ud835\udd3b", "dopf;=\ud835\udd55", "DotDot;=\u20dc", "doteq; DotEqual; esdot;=\u2250",
  "doteqdot; eDot;=\u2251", "dotminus; minusd;=\u2238", "dotplus; plusdo;=\u2214",
  "dotsquare; sdotb;=\u22a1", "DoubleLeftArrow; lArr; Leftarrow;=\u21d0",
  "DoubleLeftRightArrow; hArr; iff; Leftrightarrow;=\u21d4",
  "DoubleLongLeftArrow; Longleftarrow; xlArr;=\u27f8",
  "DoubleLongLeftRightArrow; Longleftrightarrow; xhArr;=\u27fa",
  "DoubleLongRightArrow; Longrightarrow; xrArr;=\u27f9",
  "DoubleRightArrow; Implies; rArr; Rightarrow;=\u21d2", "DoubleRightTee; vDash;=\u22a8",
  "DoubleUpArrow; uArr; Uparrow;=\u21d1", "DoubleUpDownArrow; Updownarrow; vArr;=\u21d5",
  "DoubleVerticalBar; par; parallel; shortparallel; spar;=\u2225", "DownArrowBar;=\u2913",
  "DownArrowUpArrow; duarr;=\u21f5", "DownBreve;=\u0311", "DownLeftRightVector;=\u2950",
  "DownLeftTeeVector;=\u295e", "DownLeftVector; leftharpoondown; lhard;=\u21bd", "DownLeftVectorBar;=\u2956",
  "DownRightTeeVector;=\u295f", "DownRightVector; rhard; rightharpoondown;=\u21c1",
  "DownRightVectorBar;=\u2957", "DownTee; top;=\u22a4", "DownTeeArrow; mapstodown;=\u21a7",
  "drbkarow; RBarr;=\u2910", "drcorn; lrcorner;=\u231f", "drcrop;=\u230c", "Dscr;=\ud835\udc9f",
  "dscr;=\ud835\udcb9", "DScy;=\u0405", "dscy;=\u0455", "dsol;=\u29f6", "Dstrok;=\u0110", "dstrok;=\u0111",
  "dtdot;=\u22f1", "dtri; triangledown;=\u25bf", "duhar; ReverseUpEquilibrium;=\u296f", "dwangle;=\u29a6",
  "DZcy;=\u040f", "dzcy;=\u045f", "dzigrarr;=\u27ff", "Eacute Eacute;=\u00c9", "eacute eacute;=\u00e9",
  "easter;=\u2a6e", "Ecaron;=\u011a", "ecaron;=\u011b", "ecir; eqcirc;=\u2256", "Ecirc Ecirc;=\u00ca",
  "ecirc ecirc;=\u00ea", "ecolon; eqcolon;=\u2255", "Ecy;=\u042d", "ecy;=\u044d", "Edot;=\u0116",
  "edot;=\u0117", "ee; ExponentialE; exponentiale;=\u2147", "efDot; fallingdotseq;=\u2252",
  "Efr;=\ud835\udd08", "efr;=\ud835\udd22", "eg;=\u2a9a", "Egrave Egrave;=\u00c8", "egrave egrave;=\u00e8",
  "egs; eqslantgtr;=\u2a96", "egsdot;=\u2a98", "el;=\u2a99", "Element; in; isin; isinv;=\u2208",
  "elinters;=\u23e7", "ell;=\u2113", "els; eqslantless;=\u2a95", "elsdot;=\u2a97", "Emacr;=\u0112",
  "emacr;=\u0113", "empty; emptyset; emptyv; varnothing;=\u2205", "EmptySmallSquare;=\u25fb",
  "EmptyVerySmallSquare;=\u25ab", "emsp13;=\u2004", "emsp14;=\u2005", "emsp;=\u2003", "ENG;=\u014a",
  "eng;=\u014b", "ensp;=\u2002", "Eogon;=\u0118", "eogon;=\u0119", "Eopf;=\ud835\udd3c",
  "eopf;=\ud835\udd56", "epar;=\u22d5", "eparsl;=\u29e3", "eplus;=\u2a71", "epsi; epsilon;=\u03b5",
  "Epsilon;=\u0395", "epsiv; straightepsilon; varepsilon;=\u03f5", "eqsim; EqualTilde; esim;=\u2242",
  "Equal;=\u2a75", "equals;==", "equest; questeq;=\u225f", "Equilibrium; rightleftharpoons; rlhar;=\u21cc",
  "equivDD;=\u2a78", "eqvparsl;=\u29e5", "erarr;=\u2971", "erDot; risingdotseq;=\u2253",
  "Escr; expectation;=\u2130", "escr;=\u212f", "Esim;=\u2a73", "Eta;=\u0397", "eta;=\u03b7",
  "ETH ETH;=\u00d0", "eth eth;=\u00f0", "Euml Euml;=\u00cb", "euml euml;=\u00eb", "euro;=\u20ac", "excl;=!",
  "exist; Exists;=\u2203", "Fcy;=\u0424", "fcy;=\u0444", "female;=\u2640", "ffilig;=\ufb03", "fflig;=\ufb00",
  "ffllig;=\ufb04", "Ffr;=\ud835\udd09", "ffr;=\ud835\udd23", "filig;=\ufb01", "FilledSmallSquare;=\u25fc",
  "fjlig;=fj", "flat;=\u266d", "fllig;=\ufb02", "fltns;=\u25b1", "fnof;=\u0192", "Fopf;=\ud835\udd3d",
  "fopf;=\ud835\udd57", "ForAll; forall;=\u2200", "fork; pitchfork;=\u22d4", "forkv;=\u2ad9",
  "Fouriertrf; Fscr;=\u2131", "fpartint;=\u2a0d", "frac12 frac12; half;=\u00bd", "frac13;=\u2153",
  "frac14 frac14;=\u00bc", "frac15;=\u2155", "frac16;=\u2159", "frac18;=\u215b", "frac23;=\u2154",
  "frac25;=\u2156", "frac34 frac34;=\u00be", "frac35;=\u2157", "frac38;=\u215c", "frac45;=\u2158",
  "frac56;=\u215a", "frac58;=\u215d", "frac78;=\u215e", "frasl;=\u2044", "frown; sfrown;=\u2322",
  "fscr;=\ud835\udcbb", "gacute;=\u01f5", "Gamma;=\u0393", "gamma;=\u03b3", "Gammad;=\u03dc",
  "gap; gtrapprox;=\u2a86", "Gbreve;=\u011e", "gbreve;=\u011f", "Gcedil;=\u0122", "Gcirc;=\u011c",
  "gcirc;=\u011d", "Gcy;=\u0413", "gcy;=\u0433", "Gdot;=\u0120", "gdot;=\u0121",
  "gE; geqq; GreaterFullEqual;=\u2267", "ge; geq; GreaterEqual;=\u2265", "gEl; gtreqqless;=\u2a8c",
  "gel; GreaterEqualLess; gtreqless;=\u22db", "geqslant; ges; GreaterSlantEqual;=\u2a7e", "gescc;=\u2aa9",
  "gesdot;=\u2a80", "gesdoto;=\u2a82", "gesdotol;=\u2a84", "gesl;=\u22db\ufe00", "gesles;=\u2a94",
  "Gfr;=\ud835\udd0a", "gfr;=\ud835\udd24", "Gg; ggg;=\u22d9", "gg; Gt; NestedGreaterGreater;=\u226b",
  "gimel;=\u2137", "GJcy;=\u0403", "gjcy;=\u0453", "gl; GreaterLess; gtrless;=\u2277", "gla;=\u2aa5",
  "glE;=\u2a92", "glj;=\u2aa4", "gnap; gnapprox;=\u2a8a", "gnE; gneqq;=\u2269", "gne; gneq;=\u2a88",
  "gnsim;=\u22e7", "Gopf;=\ud835\udd3e", "gopf;=\ud835\udd58", "GreaterGreater;=\u2aa2",
  "GreaterTilde; gsim; gtrsim;=\u2273", "Gscr;=\ud835\udca2", "gscr;=\u210a", "gsime;=\u2a8e",
  "gsiml;=\u2a90", "GT gt GT; gt;=>", "gtcc;=\u2aa7", "gtcir;=\u2a7a", "gtdot; gtrdot;=\u22d7",
  "gtlPar;=\u2995", "gtquest;=\u2a7c", "gtrarr;=\u2978", "gvertneqq; gvnE;=\u2269\ufe00",
  "hairsp; VeryThinSpace;=\u200a", "hamilt; HilbertSpace; Hscr;=\u210b", "HARDcy;=\u042a", "hardcy;=\u044a",
  "harr; LeftRightArrow; leftrightarrow;=\u2194", "harrcir;=\u2948", "harrw; leftrightsquigarrow;=\u21ad",
  "Hat;=^", "hbar; hslash; planck; plankv;=\u210f", "Hcirc;=\u0124", "hcirc;=\u0125",
  "hearts; heartsuit;=\u2665", "hellip; mldr;=\u2026", "hercon;=\u22b9", "Hfr; Poincareplane;=\u210c",
  "hfr;=\ud835\udd25", "hksearow; searhk;=\u2925", "hkswarow; swarhk;=\u2926", "hoarr;=\u21ff",
  "homtht;=\u223b", "hookleftarrow; larrhk;=\u21a9", "hookrightarrow; rarrhk;=\u21aa",
  "Hopf; quaternions;=\u210d", "hopf;=\ud835\udd59", "horbar;=\u2015", "hscr;=\ud835\udcbd",
  "Hstrok;=\u0126", "hstrok;=\u0127", "hybull;=\u2043", "Iacute Iacute;=\u00cd", "iacute iacute;=\u00ed",
  "ic; InvisibleComma;=\u2063", "Icirc Icirc;=\u00ce", "icirc icirc;=\u00ee", "Icy;=\u0418", "icy;=\u0438",
  "Idot;=\u0130", "IEcy;=\u0415", "iecy;=\u0435", "iexcl iexcl;=\u00a1", "Ifr; Im; image; imagpart;=\u2111",
  "ifr;=\ud835\udd26", "Igrave Igrave;=\u00cc", "igrave igrave;=\u00ec", "ii; ImaginaryI;=\u2148",
  "iiiint; qint;=\u2a0c", "iiint; tint;=\u222d", "iinfin;=\u29dc", "iiota;=\u2129", "IJlig;=\u0132",
  "ijlig;=\u0133", "Imacr;=\u012a", "imacr;=\u012b", "imagline; Iscr;=\u2110", "imath; inodot;=\u0131",
  "imof;=\u22b7", "imped;=\u01b5", "incare;=\u2105", "infin;=\u221e", "infintie;=\u29dd", "Int;=\u222c",
  "int; Integral;=\u222b", "intcal; intercal;=\u22ba", "integers; Zopf;=\u2124", "intlarhk;=\u2a17",
  "intprod; iprod;=\u2a3c", "InvisibleTimes; it;=\u2062", "IOcy;=\u0401", "iocy;=\u0451", "Iogon;=\u012e",
  "iogon;=\u012f", "Iopf;=\ud835\udd40", "iopf;=\ud835\udd5a", "Iota;=\u0399", "iota;=\u03b9",
  "iquest iquest;=\u00bf", "iscr;=\ud835\udcbe", "isindot;=\u22f5", "isinE;=\u22f9", "isins;=\u22f4",
  "isinsv;=\u22f3", "Itilde;=\u0128", "itilde;=\u0129", "Iukcy;=\u0406", "iukcy;=\u0456",
  "Iuml Iuml;=\u00cf", "iuml iuml;=\u00ef", "Jcirc;=\u0134", "jcirc;=\u0135", "Jcy;=\u0419", "jcy;=\u0439",
  "Jfr;=\ud835\udd0d", "jfr;=\ud835\udd27", "jmath;=\u0237", "Jopf;=\ud835\udd41", "jopf;=\ud835\udd5b",
  "Jscr;=\ud835\udca5", "jscr;=\ud835\udcbf", "Jsercy;=\u0408", "jsercy;=\u0458", "Jukcy;=\u0404",
  "jukcy;=\u0454", "Kappa;=\u039a", "kappa;=\u03ba", "kappav; varkappa;=\u03f0", "Kcedil;=\u0136",
  "kcedil;=\u0137", "Kcy;=\u041a", "kcy;=\u043a", "Kfr;=\ud835\udd0e", "kfr;=\ud835\udd28", "kgreen;=\u0138",
  "KHcy;=\u0425", "khcy;=\u0445", "KJcy;=\u040c", "kjcy;=\u045c", "Kopf;=\ud835\udd42", "kopf;=\ud835\udd5c",
  "Kscr;=\ud835\udca6", "kscr;=\ud835\udcc0", "lAarr; Lleftarrow;=\u21da", "Lacute;=\u0139",
  "lacute;=\u013a", "laemptyv;=\u29b4", "lagran; Laplacetrf; Lscr;=\u2112", "Lambda;=\u039b",
  "lambda;=\u03bb", "Lang;=\u27ea", "lang; langle; LeftAngleBracket;=\u27e8", "langd;=\u2991",
  "lap; lessapprox;=\u2a85", "laquo laquo;=\u00ab", "Larr; twoheadleftarrow;=\u219e",
  "larr; LeftArrow; leftarrow; ShortLeftArrow; slarr;=\u2190", "larrb; LeftArrowBar;=\u21e4",
  "larrbfs;=\u291f", "larrfs;=\u291d", "larrlp; looparrowleft;=\u21ab", "larrpl;=\u2939", "larrsim;=\u2973",
  "larrtl; leftarrowtail;=\u21a2", "lat;=\u2aab", "lAtail;=\u291b", "latail;=\u2919", "late;=\u2aad",
  "lates;=\u2aad\ufe00", "lBarr;=\u290e", "lbarr;=\u290c", "lbbrk;=\u2772", "lbrace; lcub;={",
  "lbrack; lsqb;=[", "lbrke;=\u298b", "lbrksld;=\u298f", "lbrkslu;=\u298d", "Lcaron;=\u013d",
  "lcaron;=\u013e", "Lcedil;=\u013b", "lcedil;=\u013c", "lceil; LeftCeiling;=\u2308", "Lcy;=\u041b",
  "lcy;=\u043b", "ldca;=\u2936", "ldquo; OpenCurlyDoubleQuote;=\u201c", "ldrdhar;=\u2967",
  "ldrushar;=\u294b", "ldsh;=\u21b2", "lE; leqq; LessFullEqual;=\u2266", "le; leq;=\u2264",
  "LeftArrowRightArrow; leftrightarrows; lrarr;=\u21c6", "LeftDoubleBracket; lobrk;=\u27e6",
  "LeftDownTeeVector;=\u2961", "LeftDownVectorBar;=\u2959", "LeftFloor; lfloor;=\u230a",
  "leftharpoonup; LeftVector; lharu;=\u21bc", "leftleftarrows; llarr;=\u21c7",
  "leftrightharpoons; lrhar; ReverseEquilibrium;=\u21cb", "LeftRightVector;=\u294e",
  "LeftTeeArrow; mapstoleft;=\u21a4", "LeftTeeVector;=\u295a", "leftthreetimes; lthree;=\u22cb",
  "LeftTriangle; vartriangleleft; vltri;=\u22b2", "LeftTriangleBar;=\u29cf",
  "LeftTriangleEqual; ltrie; trianglelefteq;=\u22b4", "LeftUpDownVector;=\u2951", "LeftUpTeeVector;=\u2960",
  "LeftUpVector; uharl; upharpoonleft;=\u21bf", "LeftUpVectorBar;=\u2958", "LeftVectorBar;=\u2952",
  "lEg; lesseqqgtr;=\u2a8b", "leg; lesseqgtr; LessEqualGreater;=\u22da",
  "leqslant; les; LessSlantEqual;=\u2a7d", "lescc;=\u2aa8", "lesdot;=\u2a7f", "lesdoto;=\u2a81",
  "lesdotor;=\u2a83", "lesg;=\u22da\ufe00", "lesges;=\u2a93", "lessdot; ltdot;=\u22d6",
  "LessGreater; lessgtr; lg;=\u2276", "LessLess;=\u2aa1", "lesssim; LessTilde; lsim;=\u2272",
  "lfisht;=\u297c", "Lfr;=\ud835\udd0f", "lfr;=\ud835\udd29", "lgE;=\u2a91", "lHar;=\u2962",
  "lharul;=\u296a", "lhblk;=\u2584", "LJcy;=\u0409", "ljcy;=\u0459", "Ll;=\u22d8",
  "ll; Lt; NestedLessLess;=\u226a", "llhard;=\u296b", "lltri;=\u25fa", "Lmidot;=\u013f", "lmidot;=\u0140",
  "lmoust; lmoustache;=\u23b0", "lnap; lnapprox;=\u2a89", "lnE; lneqq;=\u2268", "lne; lneq;=\u2a87",
  "lnsim;=\u22e6", "loang;=\u27ec", "loarr;=\u21fd", "LongLeftArrow; longleftarrow; xlarr;=\u27f5",
  "LongLeftRightArrow; longleftrightarrow; xharr;=\u27f7", "longmapsto; xmap;=\u27fc",
  "LongRightArrow; longrightarrow; xrarr;=\u27f6", "looparrowright; rarrlp;=\u21ac", "lopar;=\u2985",
  "Lopf;=\ud835\udd43", "lopf;=\ud835\udd5d", "loplus;=\u2a2d", "lotimes;=\u2a34", "lowast;=\u2217",
  "lowbar; UnderBar;=_", "LowerLeftArrow; swarr; swarrow;=\u2199", "LowerRightArrow; searr; searrow;=\u2198",
  "loz; lozenge;=\u25ca", "lpar;=(", "lparlt;=\u2993", "lrhard;=\u296d", "lrm;=\u200e", "lrtri;=\u22bf",
  "lsaquo;=\u2039", "lscr;=\ud835\udcc1", "Lsh; lsh;=\u21b0", "lsime;=\u2a8d", "lsimg;=\u2a8f",
  "lsquo; OpenCurlyQuote;=\u2018", "lsquor; sbquo;=\u201a", "Lstrok;=\u0141", "lstrok;=\u0142",
  "LT lt LT; lt;=<", "ltcc;=\u2aa6", "ltcir;=\u2a79", "ltimes;=\u22c9", "ltlarr;=\u2976", "ltquest;=\u2a7b",
  "ltri; triangleleft;=\u25c3", "ltrPar;=\u2996", "lurdshar;=\u294a", "luruhar;=\u2966",
  "lvertneqq; lvnE;=\u2268\ufe00", "macr macr; strns;=\u00af", "male;=\u2642", "malt; maltese;=\u2720",
  "Map;=\u2905", "map; mapsto; RightTeeArrow;=\u21a6", "mapstoup; UpTeeArrow;=\u21a5", "marker;=\u25ae",
  "mcomma;=\u2a29", "Mcy;=\u041c", "mcy;=\u043c", "mdash;=\u2014", "mDDot;=\u223a", "MediumSpace;=\u205f",
  "Mellintrf; Mscr; phmmat;=\u2133", "Mfr;=\ud835\udd10", "mfr;=\ud835\udd2a", "mho;=\u2127",
  "micro micro;=\u00b5", "mid; shortmid; smid; VerticalBar;=\u2223", "midcir;=\u2af0", "minus;=\u2212",
  "minusdu;=\u2a2a", "MinusPlus; mnplus; mp;=\u2213", "mlcp;=\u2adb", "models;=\u22a7", "Mopf;=\ud835\udd44",
  "mopf;=\ud835\udd5e", "mscr;=\ud835\udcc2", "Mu;=\u039c", "mu;=\u03bc", "multimap; mumap;=\u22b8",
  "Nacute;=\u0143", "nacute;=\u0144", "nang;=\u2220\u20d2", "nap; napprox; NotTildeTilde;=\u2249",
  "napE;=\u2a70\u0338", "napid;=\u224b\u0338", "napos;=\u0149", "natur; natural;=\u266e",
  "naturals; Nopf;=\u2115", "nbsp nbsp; NonBreakingSpace;=\u00a0", "nbump; NotHumpDownHump;=\u224e\u0338",
  "nbumpe; NotHumpEqual;=\u224f\u0338", "ncap;=\u2a43", "Ncaron;=\u0147", "ncaron;=\u0148", "Ncedil;=\u0145",
  "ncedil;=\u0146", "ncong; NotTildeFullEqual;=\u2247", "ncongdot;=\u2a6d\u0338", "ncup;=\u2a42",
  "Ncy;=\u041d", "ncy;=\u043d", "ndash;=\u2013", "ne; NotEqual;=\u2260", "nearhk;=\u2924", "neArr;=\u21d7",
  "nearr; nearrow; UpperRightArrow;=\u2197", "nedot;=\u2250\u0338",
  "NegativeMediumSpace; NegativeThickSpace; NegativeThinSpace; NegativeVeryThinSpace; ZeroWidthSpace;=\u200b",
  "nequiv; NotCongruent;=\u2262", "nesear; toea;=\u2928", "nesim; NotEqualTilde;=\u2242\u0338",
  "NewLine;=\n", "nexist; nexists; NotExists;=\u2204", "Nfr;=\ud835\udd11", "nfr;=\ud835\udd2b",
  "ngE; ngeqq; NotGreaterFullEqual;=\u2267\u0338", "nge; ngeq; NotGreaterEqual;=\u2271",
  "ngeqslant; nges; NotGreaterSlantEqual;=\u2a7e\u0338", "nGg;=\u22d9\u0338",
  "ngsim; NotGreaterTilde;=\u2275", "nGt;=\u226b\u20d2", "ngt; ngtr; NotGreater;=\u226f",
  "nGtv; NotGreaterGreater;=\u226b\u0338", "nhArr; nLeftrightarrow;=\u21ce",
  "nharr; nleftrightarrow;=\u21ae", "nhpar;=\u2af2", "ni; niv; ReverseElement; SuchThat;=\u220b",
  "nis;=\u22fc", "nisd;=\u22fa", "NJcy;=\u040a", "njcy;=\u045a", "nlArr; nLeftarrow;=\u21cd",
  "nlarr; nleftarrow;=\u219a", "nldr;=\u2025", "nlE; nleqq;=\u2266\u0338", "nle; nleq; NotLessEqual;=\u2270",
  "nleqslant; nles; NotLessSlantEqual;=\u2a7d\u0338", "nless; nlt; NotLess;=\u226e", "nLl;=\u22d8\u0338",
  "nlsim; NotLessTilde;=\u2274", "nLt;=\u226a\u20d2", "nltri; NotLeftTriangle; ntriangleleft;=\u22ea",
  "nltrie; NotLeftTriangleEqual; ntrianglelefteq;=\u22ec", "nLtv; NotLessLess;=\u226a\u0338",
  "nmid; NotVerticalBar; nshortmid; nsmid;=\u2224", "NoBreak;=\u2060", "nopf;=\ud835\udd5f",
  "not not;=\u00ac", "Not;=\u2aec", "NotCupCap;=\u226d",
  "NotDoubleVerticalBar; npar; nparallel; nshortparallel; nspar;=\u2226",
  "NotElement; notin; notinva;=\u2209", "NotGreaterLess; ntgl;=\u2279", "notindot;=\u22f5\u0338",
  "notinE;=\u22f9\u0338", "notinvb;=\u22f7", "notinvc;=\u22f6", "NotLeftTriangleBar;=\u29cf\u0338",
  "NotLessGreater; ntlg;=\u2278", "NotNestedGreaterGreater;=\u2aa2\u0338", "NotNestedLessLess;=\u2aa1\u0338",
  "notni; notniva; NotReverseElement;=\u220c", "notnivb;=\u22fe", "notnivc;=\u22fd",
  "NotPrecedes; npr; nprec;=\u2280", "NotPrecedesEqual; npre; npreceq;=\u2aaf\u0338",
  "NotPrecedesSlantEqual; nprcue;=\u22e0", "NotRightTriangle; nrtri; ntriangleright;=\u22eb",
  "NotRightTriangleBar;=\u29d0\u0338", "NotRightTriangleEqual; nrtrie; ntrianglerighteq;=\u22ed",
  "NotSquareSubset;=\u228f\u0338", "NotSquareSubsetEqual; nsqsube;=\u22e2",
  "NotSquareSuperset;=\u2290\u0338", "NotSquareSupersetEqual; nsqsupe;=\u22e3",
  "NotSubset; nsubset; vnsub;=\u2282\u20d2", "NotSubsetEqual; nsube; nsubseteq;=\u2288",
  "NotSucceeds; nsc; nsucc;=\u2281", "NotSucceedsEqual; nsce; nsucceq;=\u2ab0\u0338",
  "NotSucceedsSlantEqual; nsccue;=\u22e1", "NotSucceedsTilde;=\u227f\u0338",
  "NotSuperset; nsupset; vnsup;=\u2283\u20d2", "NotSupersetEqual; nsupe; nsupseteq;=\u2289",
  "NotTilde; nsim;=\u2241", "NotTildeEqual; nsime; nsimeq;=\u2244", "nparsl;=\u2afd\u20e5",
  "npart;=\u2202\u0338", "npolint;=\u2a14", "nrArr; nRightarrow;=\u21cf", "nrarr; nrightarrow;=\u219b",
  "nrarrc;=\u2933\u0338", "nrarrw;=\u219d\u0338", "Nscr;=\ud835\udca9", "nscr;=\ud835\udcc3", "nsub;=\u2284",
  "nsubE; nsubseteqq;=\u2ac5\u0338", "nsup;=\u2285", "nsupE; nsupseteqq;=\u2ac6\u0338",
  "Ntilde Ntilde;=\u00d1", "ntilde ntilde;=\u00f1", "Nu;=\u039d", "nu;=\u03bd", "num;=#", "numero;=\u2116",
  "numsp;=\u2007", "nvap;=\u224d\u20d2", "nVDash;=\u22af", "nVdash;=\u22ae", "nvDash;=\u22ad",
  "nvdash;=\u22ac", "nvge;=\u2265\u20d2", "nvgt;=>\u20d2", "nvHarr;=\u2904", "nvinfin;=\u29de",
  "nvlArr;=\u2902", "nvle;=\u2264\u20d2", "nvlt;=<\u20d2", "nvltrie;=\u22b4\u20d2", "nvrArr;=\u2903",
  "nvrtrie;=\u22b5\u20d2", "nvsim;=\u223c\u20d2", "nwarhk;=\u2923", "nwArr;=\u21d6",
  "nwarr; nwarrow; UpperLeftArrow;=\u2196", "nwnear;=\u2927", "Oacute Oacute;=\u00d3",
  "oacute oacute;=\u00f3", "Ocirc Ocirc;=\u00d4", "ocirc ocirc;=\u00f4", "Ocy;=\u041e", "ocy;=\u043e",
  "Odblac;=\u0150", "odblac;=\u0151", "odiv;=\u2a38", "odsold;=\u29bc", "OElig;=\u0152", "oelig;=\u0153",
  "ofcir;=\u29bf", "Ofr;=\ud835\udd12", "ofr;=\ud835\udd2c", "ogon;=\u02db", "Ograve Ograve;=\u00d2",
  "ograve ograve;=\u00f2", "ogt;=\u29c1", "ohbar;=\u29b5", "ohm; Omega;=\u03a9", "olcir;=\u29be",
  "olcross;=\u29bb", "oline; OverBar;=\u203e", "olt;=\u29c0", "Omacr;=\u014c", "omacr;=\u014d",
  "omega;=\u03c9", "Omicron;=\u039f", "omicron;=\u03bf", "omid;=\u29b6", "Oopf;=\ud835\udd46",
  "oopf;=\ud835\udd60", "opar;=\u29b7", "operp;=\u29b9", "Or;=\u2a54", "or; vee;=\u2228", "ord;=\u2a5d",
  "order; orderof; oscr;=\u2134", "ordf ordf;=\u00aa", "ordm ordm;=\u00ba", "origof;=\u22b6", "oror;=\u2a56",
  "orslope;=\u2a57", "orv;=\u2a5b", "Oscr;=\ud835\udcaa", "Oslash Oslash;=\u00d8", "oslash oslash;=\u00f8",
  "osol;=\u2298", "Otilde Otilde;=\u00d5", "otilde otilde;=\u00f5", "Otimes;=\u2a37", "otimesas;=\u2a36",
  "Ouml Ouml;=\u00d6", "ouml ouml;=\u00f6", "ovbar;=\u233d", "OverBrace;=\u23de",
  "OverBracket; tbrk;=\u23b4", "OverParenthesis;=\u23dc", "para para;=\u00b6", "parsim;=\u2af3",
  "parsl;=\u2afd", "part; PartialD;=\u2202", "Pcy;=\u041f", "pcy;=\u043f", "percnt;=%", "period;=.",
  "permil;=\u2030", "pertenk;=\u2031", "Pfr;=\ud835\udd13", "pfr;=\ud835\udd2d", "Phi;=\u03a6",
  "phi;=\u03c6", "phiv; straightphi; varphi;=\u03d5", "phone;=\u260e", "Pi;=\u03a0", "pi;=\u03c0",
  "piv; varpi;=\u03d6", "planckh;=\u210e", "plus;=+", "plusacir;=\u2a23", "pluscir;=\u2a22",
  "plusdu;=\u2a25", "pluse;=\u2a72", "PlusMinus; plusmn plusmn; pm;=\u00b1", "plussim;=\u2a26",
  "plustwo;=\u2a27", "pointint;=\u2a15", "Popf; primes;=\u2119", "popf;=\ud835\udd61", "pound pound;=\u00a3",
  "Pr;=\u2abb", "pr; prec; Precedes;=\u227a", "prap; precapprox;=\u2ab7",
  "prcue; preccurlyeq; PrecedesSlantEqual;=\u227c", "prE;=\u2ab3", "pre; PrecedesEqual; preceq;=\u2aaf",
  "PrecedesTilde; precsim; prsim;=\u227e", "precnapprox; prnap;=\u2ab9", "precneqq; prnE;=\u2ab5",
  "precnsim; prnsim;=\u22e8", "Prime;=\u2033", "prime;=\u2032", "prod; Product;=\u220f", "profalar;=\u232e",
  "profline;=\u2312", "profsurf;=\u2313", "prop; Proportional; propto; varpropto; vprop;=\u221d",
  "prurel;=\u22b0", "Pscr;=\ud835\udcab", "pscr;=\ud835\udcc5", "Psi;=\u03a8", "psi;=\u03c8",
  "puncsp;=\u2008", "Qfr;=\ud835\udd14", "qfr;=\ud835\udd2e", "Qopf; rationals;=\u211a",
  "qopf;=\ud835\udd62", "qprime;=\u2057", "Qscr;=\ud835\udcac", "qscr;=\ud835\udcc6", "quatint;=\u2a16",
  "quest;=?", "QUOT quot QUOT; quot;=\"", "rAarr; Rrightarrow;=\u21db", "race;=\u223d\u0331",
  "Racute;=\u0154", "racute;=\u0155", "radic; Sqrt;=\u221a", "raemptyv;=\u29b3", "Rang;=\u27eb",
  "rang; rangle; RightAngleBracket;=\u27e9", "rangd;=\u2992", "range;=\u29a5", "raquo raquo;=\u00bb",
  "Rarr; twoheadrightarrow;=\u21a0", "rarr; RightArrow; rightarrow; ShortRightArrow; srarr;=\u2192",
  "rarrap;=\u2975", "rarrb; RightArrowBar;=\u21e5", "rarrbfs;=\u2920", "rarrc;=\u2933", "rarrfs;=\u291e",
  "rarrpl;=\u2945", "rarrsim;=\u2974", "Rarrtl;=\u2916", "rarrtl; rightarrowtail;=\u21a3",
  "rarrw; rightsquigarrow;=\u219d", "rAtail;=\u291c", "ratail;=\u291a", "ratio;=\u2236", "rbbrk;=\u2773",
  "rbrace; rcub;=}", "rbrack; rsqb;=]", "rbrke;=\u298c", "rbrksld;=\u298e", "rbrkslu;=\u2990",
  "Rcaron;=\u0158", "rcaron;=\u0159", "Rcedil;=\u0156", "rcedil;=\u0157", "rceil; RightCeiling;=\u2309",
  "Rcy;=\u0420", "rcy;=\u0440", "rdca;=\u2937", "rdldhar;=\u2969", "rdsh;=\u21b3",
  "Re; real; realpart; Rfr;=\u211c", "realine; Rscr;=\u211b", "reals; Ropf;=\u211d", "rect;=\u25ad",
  "rfisht;=\u297d", "rfloor; RightFloor;=\u230b", "rfr;=\ud835\udd2f", "rHar;=\u2964",
  "rharu; rightharpoonup; RightVector;=\u21c0", "rharul;=\u296c", "Rho;=\u03a1", "rho;=\u03c1",
  "rhov; varrho;=\u03f1", "RightArrowLeftArrow; rightleftarrows; rlarr;=\u21c4",
  "RightDoubleBracket; robrk;=\u27e7", "RightDownTeeVector;=\u295d", "RightDownVectorBar;=\u2955",
  "rightrightarrows; rrarr;=\u21c9", "RightTee; vdash;=\u22a2", "RightTeeVector;=\u295b",
  "rightthreetimes; rthree;=\u22cc", "RightTriangle; vartriangleright; vrtri;=\u22b3",
  "RightTriangleBar;=\u29d0", "RightTriangleEqual; rtrie; trianglerighteq;=\u22b5",
  "RightUpDownVector;=\u294f", "RightUpTeeVector;=\u295c", "RightUpVector; uharr; upharpoonright;=\u21be",
  "RightUpVectorBar;=\u2954", "RightVectorBar;=\u2953", "ring;=\u02da", "rlm;=\u200f",
  "rmoust; rmoustache;=\u23b1", "rnmid;=\u2aee", "roang;=\u27ed", "roarr;=\u21fe", "ropar;=\u2986",
  "ropf;=\ud835\udd63", "roplus;=\u2a2e", "rotimes;=\u2a35", "RoundImplies;=\u2970", "rpar;=)",
  "rpargt;=\u2994", "rppolint;=\u2a12", "rsaquo;=\u203a", "rscr;=\ud835\udcc7", "Rsh; rsh;=\u21b1",
  "rtimes;=\u22ca", "rtri; triangleright;=\u25b9", "rtriltri;=\u29ce", "RuleDelayed;=\u29f4",
  "ruluhar;=\u2968", "rx;=\u211e", "Sacute;=\u015a", "sacute;=\u015b", "Sc;=\u2abc",
  "sc; succ; Succeeds;=\u227b", "scap; succapprox;=\u2ab8", "Scaron;=\u0160", "scaron;=\u0161",
  "sccue; succcurlyeq; SucceedsSlantEqual;=\u227d", "scE;=\u2ab4", "sce; SucceedsEqual; succeq;=\u2ab0",
  "Scedil;=\u015e", "scedil;=\u015f", "Scirc;=\u015c", "scirc;=\u015d", "scnap; succnapprox;=\u2aba",
  "scnE; succneqq;=\u2ab6", "scnsim; succnsim;=\u22e9", "scpolint;=\u2a13",
  "scsim; SucceedsTilde; succsim;=\u227f", "Scy;=\u0421", "scy;=\u0441", "sdot;=\u22c5", "sdote;=\u2a66",
  "seArr;=\u21d8", "sect sect;=\u00a7", "semi;=;", "seswar; tosa;=\u2929", "sext;=\u2736",
  "Sfr;=\ud835\udd16", "sfr;=\ud835\udd30", "sharp;=\u266f", "SHCHcy;=\u0429", "shchcy;=\u0449",
  "SHcy;=\u0428", "shcy;=\u0448", "ShortUpArrow; uarr; UpArrow; uparrow;=\u2191", "shy shy;=\u00ad",
  "Sigma;=\u03a3", "sigma;=\u03c3", "sigmaf; sigmav; varsigma;=\u03c2",
  "sim; thicksim; thksim; Tilde;=\u223c", "simdot;=\u2a6a", "sime; simeq; TildeEqual;=\u2243",
  "simg;=\u2a9e", "simgE;=\u2aa0", "siml;=\u2a9d", "simlE;=\u2a9f", "simne;=\u2246", "simplus;=\u2a24",
  "simrarr;=\u2972", "smashp;=\u2a33", "smeparsl;=\u29e4", "smile; ssmile;=\u2323", "smt;=\u2aaa",
  "smte;=\u2aac", "smtes;=\u2aac\ufe00", "SOFTcy;=\u042c", "softcy;=\u044c", "sol;=/", "solb;=\u29c4",
  "solbar;=\u233f", "Sopf;=\ud835\udd4a", "sopf;=\ud835\udd64", "spades; spadesuit;=\u2660",
  "sqcap; SquareIntersection;=\u2293", "sqcaps;=\u2293\ufe00", "sqcup; SquareUnion;=\u2294",
  "sqcups;=\u2294\ufe00", "sqsub; sqsubset; SquareSubset;=\u228f",
  "sqsube; sqsubseteq; SquareSubsetEqual;=\u2291", "sqsup; sqsupset; SquareSuperset;=\u2290",
  "sqsupe; sqsupseteq; SquareSupersetEqual;=\u2292", "squ; Square; square;=\u25a1", "Sscr;=\ud835\udcae",
  "sscr;=\ud835\udcc8", "sstarf; Star;=\u22c6", "star;=\u2606", "Sub; Subset;=\u22d0", "sub; subset;=\u2282",
  "subdot;=\u2abd", "subE; subseteqq;=\u2ac5", "sube; subseteq; SubsetEqual;=\u2286", "subedot;=\u2ac3",
  "submult;=\u2ac1", "subnE; subsetneqq;=\u2acb", "subne; subsetneq;=\u228a", "subplus;=\u2abf",
  "subrarr;=\u2979", "subsim;=\u2ac7", "subsub;=\u2ad5", "subsup;=\u2ad3", "Sum; sum;=\u2211",
  "sung;=\u266a", "sup1 sup1;=\u00b9", "sup2 sup2;=\u00b2", "sup3 sup3;=\u00b3", "Sup; Supset;=\u22d1",
  "sup; Superset; supset;=\u2283", "supdot;=\u2abe", "supdsub;=\u2ad8", "supE; supseteqq;=\u2ac6",
  "supe; SupersetEqual; supseteq;=\u2287", "supedot;=\u2ac4", "suphsol;=\u27c9", "suphsub;=\u2ad7",
  "suplarr;=\u297b", "supmult;=\u2ac2", "supnE; supsetneqq;=\u2acc", "supne; supsetneq;=\u228b",
  "supplus;=\u2ac0", "supsim;=\u2ac8", "supsub;=\u2ad4", "supsup;=\u2ad6", "swArr;=\u21d9", "swnwar;=\u292a",
  "szlig szlig;=\u00df", "Tab;=\t", "target;=\u2316", "Tau;=\u03a4", "tau;=\u03c4", "Tcaron;=\u0164",
  "tcaron;=\u0165", "Tcedil;=\u0162", "tcedil;=\u0163", "Tcy;=\u0422", "tcy;=\u0442",
  "tdot; TripleDot;=\u20db", "telrec;=\u2315", "Tfr;=\ud835\udd17", "tfr;=\ud835\udd31",
  "there4; Therefore; therefore;=\u2234", "Theta;=\u0398", "theta;=\u03b8",
  "thetasym; thetav; vartheta;=\u03d1", "ThickSpace;=\u205f\u200a", "thinsp; ThinSpace;=\u2009",
  "THORN THORN;=\u00de", "thorn thorn;=\u00fe", "times times;=\u00d7", "timesbar;=\u2a31", "timesd;=\u2a30",
  "topbot;=\u2336", "topcir;=\u2af1", "Topf;=\ud835\udd4b", "topf;=\ud835\udd65", "topfork;=\u2ada",
  "tprime;=\u2034", "TRADE; trade;=\u2122", "triangle; utri;=\u25b5", "triangleq; trie;=\u225c",
  "tridot;=\u25ec", "triminus;=\u2a3a", "triplus;=\u2a39", "trisb;=\u29cd", "tritime;=\u2a3b",
  "trpezium;=\u23e2", "Tscr;=\ud835\udcaf", "tscr;=\ud835\udcc9", "TScy;=\u0426", "tscy;=\u0446",
  "TSHcy;=\u040b", "tshcy;=\u045b", "Tstrok;=\u0166", "tstrok;=\u0167", "Uacute Uacute;=\u00da",
  "uacute uacute;=\u00fa", "Uarr;=\u219f", "Uarrocir;=\u2949", "Ubrcy;=\u040e", "ubrcy;=\u045e",
  "Ubreve;=\u016c", "ubreve;=\u016d", "Ucirc Ucirc;=\u00db", "ucirc ucirc;=\u00fb", "Ucy;=\u0423",
  "ucy;=\u0443", "udarr; UpArrowDownArrow;=\u21c5", "Udblac;=\u0170", "udblac;=\u0171",
  "udhar; UpEquilibrium;=\u296e", "ufisht;=\u297e", "Ufr;=\ud835\udd18", "ufr;=\ud835\udd32",
  "Ugrave Ugrave;=\u00d9", "ugrave ugrave;=\u00f9", "uHar;=\u2963", "uhblk;=\u2580",
  "ulcorn; ulcorner;=\u231c", "ulcrop;=\u230f", "ultri;=\u25f8", "Umacr;=\u016a", "umacr;=\u016b",
  "UnderBrace;=\u23df", "UnderParenthesis;=\u23dd", "UnionPlus; uplus;=\u228e", "Uogon;=\u0172",
  "uogon;=\u0173", "Uopf;=\ud835\udd4c", "uopf;=\ud835\udd66", "UpArrowBar;=\u2912",
  "UpDownArrow; updownarrow; varr;=\u2195", "Upsi; upsih;=\u03d2", "upsi; upsilon;=\u03c5",
  "Upsilon;=\u03a5", "upuparrows; uuarr;=\u21c8", "urcorn; urcorner;=\u231d", "urcrop;=\u230e",
  "Uring;=\u016e", "uring;=\u016f", "urtri;=\u25f9", "Uscr;=\ud835\udcb0", "uscr;=\ud835\udcca",
  "utdot;=\u22f0", "Utilde;=\u0168", "utilde;=\u0169", "Uuml Uuml;=\u00dc", "uuml uuml;=\u00fc",
  "uwangle;=\u29a7", "vangrt;=\u299c", "varsubsetneq; vsubne;=\u228a\ufe00",
  "varsubsetneqq; vsubnE;=\u2acb\ufe00", "varsupsetneq; vsupne;=\u228b\ufe00",
  "varsupsetneqq; vsupnE;=\u2acc\ufe00", "Vbar;=\u2aeb", "vBar;=\u2ae8", "vBarv;=\u2ae9", "Vcy;=\u0412",
  "vcy;=\u0432", "VDash;=\u22ab", "Vdash;=\u22a9", "Vdashl;=\u2ae6", "veebar;=\u22bb", "veeeq;=\u225a",
  "vellip;=\u22ee", "Verbar; Vert;=\u2016", "verbar; vert; VerticalLine;=|", "VerticalSeparator;=\u2758",
  "VerticalTilde; wr; wreath;=\u2240", "Vfr;=\ud835\udd19", "vfr;=\ud835\udd33", "Vopf;=\ud835\udd4d",
  "vopf;=\ud835\udd67", "Vscr;=\ud835\udcb1", "vscr;=\ud835\udccb", "Vvdash;=\u22aa", "vzigzag;=\u299a",
  "Wcirc;=\u0174", "wcirc;=\u0175", "wedbar;=\u2a5f", "wedgeq;=\u2259", "weierp; wp;=\u2118",
  "Wfr;=\ud835\udd1a", "wfr;=\ud835\udd34", "Wopf;=\ud835\udd4e", "wopf;=\ud835\udd68", "Wscr;=\ud835\udcb2",
  "wscr;=\ud835\udccc", "Xfr;=\ud835\udd1b", "xfr;=\ud835\udd35", "Xi;=\u039e", "xi;=\u03be", "xnis;=\u22fb",
  "Xopf;=\ud835\udd4f", "xopf;=\ud835\udd69", "Xscr;=\ud835\udcb3", "xscr;=\ud835\udccd",
  "Yacute Yacute;=\u00dd", "yacute yacute;=\u00fd", "YAcy;=\u042f", "yacy;=\u044f", "Ycirc;=\u0176",
  "ycirc;=\u0177", "Ycy;=\u042b", "ycy;=\u044b", "yen yen;=\u00a5", "Yfr;=\ud835\udd1c", "yfr;=\ud835\udd36",
  "YIcy;=\u0407", "yicy;=\u0457", "Yopf;=\ud835\udd50", "yopf;=\ud835\udd6a", "Yscr;=\ud835\udcb4",
  "yscr;=\ud835\udcce", "YUcy;=\u042e", "yucy;=\u044e", "yuml yuml;=\u00ff", "Yuml;=\u0178",
  "Zacute;=\u0179", "zacute;=\u017a", "Zcaron;=\u017d", "zcaron;=\u017e", "Zcy;=\u0417", "zcy;=\u0437",
  "Zdot;=\u017b", "zdot;=\u017c", "zeetrf; Zfr;=\u2128", "Zeta;=\u0396", "zeta;=\u03b6", "zfr;=\ud835\udd37",
  "ZHcy;=\u0416", "zhcy;=\u0436", "zigrarr;=\u21dd", "zopf;=\ud835\udd6b", "Zscr;=\ud835\udcb5",
  "zscr;=\ud835\udccf", "zwj;=\u200d", "zwnj;=\u200c",
];

// html._invalid_charrefs: numeric references the HTML5 spec remaps.
const INVALID_CHARREFS = {
  0x0: "\ufffd", 0xd: "\r", 0x80: "\u20ac", 0x81: "\u0081", 0x82: "\u201a", 0x83: "\u0192", 0x84: "\u201e",
  0x85: "\u2026", 0x86: "\u2020", 0x87: "\u2021", 0x88: "\u02c6", 0x89: "\u2030", 0x8a: "\u0160",
  0x8b: "\u2039", 0x8c: "\u0152", 0x8d: "\u008d", 0x8e: "\u017d", 0x8f: "\u008f", 0x90: "\u0090",
  0x91: "\u2018", 0x92: "\u2019", 0x93: "\u201c", 0x94: "\u201d", 0x95: "\u2022", 0x96: "\u2013",
  0x97: "\u2014", 0x98: "\u02dc", 0x99: "\u2122", 0x9a: "\u0161", 0x9b: "\u203a", 0x9c: "\u0153",
  0x9d: "\u009d", 0x9e: "\u017e", 0x9f: "\u0178",
};

// html._invalid_codepoints as [first, last] ranges: numeric references to these become ''.
const INVALID_CODEPOINTS = [
  [0x1, 0x8], [0xb, 0xb], [0xe, 0x1f], [0x7f, 0x9f], [0xfdd0, 0xfdef], [0xfffe, 0xffff], [0x1fffe, 0x1ffff],
  [0x2fffe, 0x2ffff], [0x3fffe, 0x3ffff], [0x4fffe, 0x4ffff], [0x5fffe, 0x5ffff], [0x6fffe, 0x6ffff],
  [0x7fffe, 0x7ffff], [0x8fffe, 0x8ffff], [0x9fffe, 0x9ffff], [0xafffe, 0xaffff], [0xbfffe, 0xbffff],
  [0xcfffe, 0xcffff], [0xdfffe, 0xdffff], [0xefffe, 0xeffff], [0xffffe, 0xfffff], [0x10fffe, 0x10ffff],
];

// Bytes 0x80-0xFF of ftfy's single-byte codecs (bytes 0x00-0x7F are ASCII in all of them; the
// sloppy ones also decode byte 0x1A as U+FFFD). latin-1 is the identity and is built in code.
const CODEC_HIGH = {
  "sloppy-windows-1252":
    "\u20ac\u0081\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\u008d\u017d\u008f" +
    "\u0090\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u009d\u017e\u0178" +
    "\u00a0\u00a1\u00a2\u00a3\u00a4\u00a5\u00a6\u00a7\u00a8\u00a9\u00aa\u00ab\u00ac\u00ad\u00ae\u00af" +
    "\u00b0\u00b1\u00b2\u00b3\u00b4\u00b5\u00b6\u00b7\u00b8\u00b9\u00ba\u00bb\u00bc\u00bd\u00be\u00bf" +
    "\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c6\u00c7\u00c8\u00c9\u00ca\u00cb\u00cc\u00cd\u00ce\u00cf" +
    "\u00d0\u00d1\u00d2\u00d3\u00d4\u00d5\u00d6\u00d7\u00d8\u00d9\u00da\u00db\u00dc\u00dd\u00de\u00df" +
    "\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6\u00e7\u00e8\u00e9\u00ea\u00eb\u00ec\u00ed\u00ee\u00ef" +
    "\u00f0\u00f1\u00f2\u00f3\u00f4\u00f5\u00f6\u00f7\u00f8\u00f9\u00fa\u00fb\u00fc\u00fd\u00fe\u00ff",
  "sloppy-windows-1251":
    "\u0402\u0403\u201a\u0453\u201e\u2026\u2020\u2021\u20ac\u2030\u0409\u2039\u040a\u040c\u040b\u040f" +
    "\u0452\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u0098\u2122\u0459\u203a\u045a\u045c\u045b\u045f" +
    "\u00a0\u040e\u045e\u0408\u00a4\u0490\u00a6\u00a7\u0401\u00a9\u0404\u00ab\u00ac\u00ad\u00ae\u0407" +
    "\u00b0\u00b1\u0406\u0456\u0491\u00b5\u00b6\u00b7\u0451\u2116\u0454\u00bb\u0458\u0405\u0455\u0457" +
    "\u0410\u0411\u0412\u0413\u0414\u0415\u0416\u0417\u0418\u0419\u041a\u041b\u041c\u041d\u041e\u041f" +
    "\u0420\u0421\u0422\u0423\u0424\u0425\u0426\u0427\u0428\u0429\u042a\u042b\u042c\u042d\u042e\u042f" +
    "\u0430\u0431\u0432\u0433\u0434\u0435\u0436\u0437\u0438\u0439\u043a\u043b\u043c\u043d\u043e\u043f" +
    "\u0440\u0441\u0442\u0443\u0444\u0445\u0446\u0447\u0448\u0449\u044a\u044b\u044c\u044d\u044e\u044f",
  "sloppy-windows-1250":
    "\u20ac\u0081\u201a\u0083\u201e\u2026\u2020\u2021\u0088\u2030\u0160\u2039\u015a\u0164\u017d\u0179" +
    "\u0090\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u0098\u2122\u0161\u203a\u015b\u0165\u017e\u017a" +
    "\u00a0\u02c7\u02d8\u0141\u00a4\u0104\u00a6\u00a7\u00a8\u00a9\u015e\u00ab\u00ac\u00ad\u00ae\u017b" +
    "\u00b0\u00b1\u02db\u0142\u00b4\u00b5\u00b6\u00b7\u00b8\u0105\u015f\u00bb\u013d\u02dd\u013e\u017c" +
    "\u0154\u00c1\u00c2\u0102\u00c4\u0139\u0106\u00c7\u010c\u00c9\u0118\u00cb\u011a\u00cd\u00ce\u010e" +
    "\u0110\u0143\u0147\u00d3\u00d4\u0150\u00d6\u00d7\u0158\u016e\u00da\u0170\u00dc\u00dd\u0162\u00df" +
    "\u0155\u00e1\u00e2\u0103\u00e4\u013a\u0107\u00e7\u010d\u00e9\u0119\u00eb\u011b\u00ed\u00ee\u010f" +
    "\u0111\u0144\u0148\u00f3\u00f4\u0151\u00f6\u00f7\u0159\u016f\u00fa\u0171\u00fc\u00fd\u0163\u02d9",
  "sloppy-windows-1253":
    "\u20ac\u0081\u201a\u0192\u201e\u2026\u2020\u2021\u0088\u2030\u008a\u2039\u008c\u008d\u008e\u008f" +
    "\u0090\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u0098\u2122\u009a\u203a\u009c\u009d\u009e\u009f" +
    "\u00a0\u0385\u0386\u00a3\u00a4\u00a5\u00a6\u00a7\u00a8\u00a9\u00aa\u00ab\u00ac\u00ad\u00ae\u2015" +
    "\u00b0\u00b1\u00b2\u00b3\u0384\u00b5\u00b6\u00b7\u0388\u0389\u038a\u00bb\u038c\u00bd\u038e\u038f" +
    "\u0390\u0391\u0392\u0393\u0394\u0395\u0396\u0397\u0398\u0399\u039a\u039b\u039c\u039d\u039e\u039f" +
    "\u03a0\u03a1\u00d2\u03a3\u03a4\u03a5\u03a6\u03a7\u03a8\u03a9\u03aa\u03ab\u03ac\u03ad\u03ae\u03af" +
    "\u03b0\u03b1\u03b2\u03b3\u03b4\u03b5\u03b6\u03b7\u03b8\u03b9\u03ba\u03bb\u03bc\u03bd\u03be\u03bf" +
    "\u03c0\u03c1\u03c2\u03c3\u03c4\u03c5\u03c6\u03c7\u03c8\u03c9\u03ca\u03cb\u03cc\u03cd\u03ce\u00ff",
  "sloppy-windows-1254":
    "\u20ac\u0081\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\u008d\u008e\u008f" +
    "\u0090\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u009d\u009e\u0178" +
    "\u00a0\u00a1\u00a2\u00a3\u00a4\u00a5\u00a6\u00a7\u00a8\u00a9\u00aa\u00ab\u00ac\u00ad\u00ae\u00af" +
    "\u00b0\u00b1\u00b2\u00b3\u00b4\u00b5\u00b6\u00b7\u00b8\u00b9\u00ba\u00bb\u00bc\u00bd\u00be\u00bf" +
    "\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c6\u00c7\u00c8\u00c9\u00ca\u00cb\u00cc\u00cd\u00ce\u00cf" +
    "\u011e\u00d1\u00d2\u00d3\u00d4\u00d5\u00d6\u00d7\u00d8\u00d9\u00da\u00db\u00dc\u0130\u015e\u00df" +
    "\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6\u00e7\u00e8\u00e9\u00ea\u00eb\u00ec\u00ed\u00ee\u00ef" +
    "\u011f\u00f1\u00f2\u00f3\u00f4\u00f5\u00f6\u00f7\u00f8\u00f9\u00fa\u00fb\u00fc\u0131\u015f\u00ff",
  "sloppy-windows-1257":
    "\u20ac\u0081\u201a\u0083\u201e\u2026\u2020\u2021\u0088\u2030\u008a\u2039\u008c\u00a8\u02c7\u00b8" +
    "\u0090\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u0098\u2122\u009a\u203a\u009c\u00af\u02db\u009f" +
    "\u00a0\u00a1\u00a2\u00a3\u00a4\u00a5\u00a6\u00a7\u00d8\u00a9\u0156\u00ab\u00ac\u00ad\u00ae\u00c6" +
    "\u00b0\u00b1\u00b2\u00b3\u00b4\u00b5\u00b6\u00b7\u00f8\u00b9\u0157\u00bb\u00bc\u00bd\u00be\u00e6" +
    "\u0104\u012e\u0100\u0106\u00c4\u00c5\u0118\u0112\u010c\u00c9\u0179\u0116\u0122\u0136\u012a\u013b" +
    "\u0160\u0143\u0145\u00d3\u014c\u00d5\u00d6\u00d7\u0172\u0141\u015a\u016a\u00dc\u017b\u017d\u00df" +
    "\u0105\u012f\u0101\u0107\u00e4\u00e5\u0119\u0113\u010d\u00e9\u017a\u0117\u0123\u0137\u012b\u013c" +
    "\u0161\u0144\u0146\u00f3\u014d\u00f5\u00f6\u00f7\u0173\u0142\u015b\u016b\u00fc\u017c\u017e\u02d9",
  "iso-8859-2":
    "\u0080\u0081\u0082\u0083\u0084\u0085\u0086\u0087\u0088\u0089\u008a\u008b\u008c\u008d\u008e\u008f" +
    "\u0090\u0091\u0092\u0093\u0094\u0095\u0096\u0097\u0098\u0099\u009a\u009b\u009c\u009d\u009e\u009f" +
    "\u00a0\u0104\u02d8\u0141\u00a4\u013d\u015a\u00a7\u00a8\u0160\u015e\u0164\u0179\u00ad\u017d\u017b" +
    "\u00b0\u0105\u02db\u0142\u00b4\u013e\u015b\u02c7\u00b8\u0161\u015f\u0165\u017a\u02dd\u017e\u017c" +
    "\u0154\u00c1\u00c2\u0102\u00c4\u0139\u0106\u00c7\u010c\u00c9\u0118\u00cb\u011a\u00cd\u00ce\u010e" +
    "\u0110\u0143\u0147\u00d3\u00d4\u0150\u00d6\u00d7\u0158\u016e\u00da\u0170\u00dc\u00dd\u0162\u00df" +
    "\u0155\u00e1\u00e2\u0103\u00e4\u013a\u0107\u00e7\u010d\u00e9\u0119\u00eb\u011b\u00ed\u00ee\u010f" +
    "\u0111\u0144\u0148\u00f3\u00f4\u0151\u00f6\u00f7\u0159\u016f\u00fa\u0171\u00fc\u00fd\u0163\u02d9",
  "macroman":
    "\u00c4\u00c5\u00c7\u00c9\u00d1\u00d6\u00dc\u00e1\u00e0\u00e2\u00e4\u00e3\u00e5\u00e7\u00e9\u00e8" +
    "\u00ea\u00eb\u00ed\u00ec\u00ee\u00ef\u00f1\u00f3\u00f2\u00f4\u00f6\u00f5\u00fa\u00f9\u00fb\u00fc" +
    "\u2020\u00b0\u00a2\u00a3\u00a7\u2022\u00b6\u00df\u00ae\u00a9\u2122\u00b4\u00a8\u2260\u00c6\u00d8" +
    "\u221e\u00b1\u2264\u2265\u00a5\u00b5\u2202\u2211\u220f\u03c0\u222b\u00aa\u00ba\u03a9\u00e6\u00f8" +
    "\u00bf\u00a1\u00ac\u221a\u0192\u2248\u2206\u00ab\u00bb\u2026\u00a0\u00c0\u00c3\u00d5\u0152\u0153" +
    "\u2013\u2014\u201c\u201d\u2018\u2019\u00f7\u25ca\u00ff\u0178\u2044\u20ac\u2039\u203a\ufb01\ufb02" +
    "\u2021\u00b7\u201a\u201e\u2030\u00c2\u00ca\u00c1\u00cb\u00c8\u00cd\u00ce\u00cf\u00cc\u00d3\u00d4" +
    "\uf8ff\u00d2\u00da\u00db\u00d9\u0131\u02c6\u02dc\u00af\u02d8\u02d9\u02da\u00b8\u02dd\u02db\u02c7",
  "cp437":
    "\u00c7\u00fc\u00e9\u00e2\u00e4\u00e0\u00e5\u00e7\u00ea\u00eb\u00e8\u00ef\u00ee\u00ec\u00c4\u00c5" +
    "\u00c9\u00e6\u00c6\u00f4\u00f6\u00f2\u00fb\u00f9\u00ff\u00d6\u00dc\u00a2\u00a3\u00a5\u20a7\u0192" +
    "\u00e1\u00ed\u00f3\u00fa\u00f1\u00d1\u00aa\u00ba\u00bf\u2310\u00ac\u00bd\u00bc\u00a1\u00ab\u00bb" +
    "\u2591\u2592\u2593\u2502\u2524\u2561\u2562\u2556\u2555\u2563\u2551\u2557\u255d\u255c\u255b\u2510" +
    "\u2514\u2534\u252c\u251c\u2500\u253c\u255e\u255f\u255a\u2554\u2569\u2566\u2560\u2550\u256c\u2567" +
    "\u2568\u2564\u2565\u2559\u2558\u2552\u2553\u256b\u256a\u2518\u250c\u2588\u2584\u258c\u2590\u2580" +
    "\u03b1\u00df\u0393\u03c0\u03a3\u03c3\u00b5\u03c4\u03a6\u0398\u03a9\u03b4\u221e\u03c6\u03b5\u2229" +
    "\u2261\u00b1\u2265\u2264\u2320\u2321\u00f7\u2248\u00b0\u2219\u00b7\u221a\u207f\u00b2\u25a0\u00a0",
};

// ftfy.badness.MOJIBAKE_CATEGORIES: regex character-class bodies (with ranges).
const MOJIBAKE = {
  common: "\u00a0\u00ad\u00b7\u00b4\u2013\u2014\u2015\u2026\u2019",
  c1: "\u0080-\u009f",
  bad:
    "\u00a6\u00a4\u00a8\u00ac\u00af\u00b8\u0192\u02c6\u02c7\u02d8\u02db\u02dc\u2020\u2021\u2030\u2310" +
    "\u25ca\ufffd\u00aa\u00ba",
  law: "\u00b6\u00a7",
  currency: "\u00a2\u00a3\u00a5\u20a7\u20ac",
  start_punctuation: "\u00a1\u00ab\u00bf\u00a9\u0384\u0385\u2018\u201a\u201c\u201e\u2022\u2039\uf8ff",
  end_punctuation: "\u00ae\u00bb\u02dd\u201d\u203a\u2122",
  numeric:
    "\u00b2\u00b3\u00b9\u00b1\u00bc\u00bd\u00be\u00d7\u00b5\u00f7\u2044\u2202\u2206\u220f\u2211\u221a" +
    "\u221e\u2229\u222b\u2248\u2260\u2261\u2264\u2265\u2116",
  kaomoji:
    "\u00d2-\u00d6\u00d9-\u00dc\u00f2-\u00f6\u00f8-\u00fc\u0150\u014c\u016a\u0172" +
    "\u00b0",
  upper_accented:
    "\u00c0-\u00d1\u00d8\u00dc\u00dd\u0102\u0100\u0104\u0106\u010c\u010e\u0110\u0118\u011a\u0112" +
    "\u0116\u011e\u0122\u0130\u012a\u0136\u0139\u013d\u0141\u013b\u0143\u0147\u0145\u0152\u0158\u015a" +
    "\u015e\u0160\u0162\u0164\u016e\u0170\u0178\u0179\u017b\u017d\u0490",
  lower_accented:
    "\u00df\u00e0-\u00f1\u0103\u0105\u0101\u0107\u010d\u010f\u0111\u0119\u011b\u0113\u0117\u011f" +
    "\u0123\u012f\u012b\u0137\u013a\u013e\u0142\u013c\u0153\u0155\u015b\u015f\u0161\u0165\u00fc\u017a" +
    "\u017c\u017e\u0491\ufb01\ufb02",
  upper_common: "\u00de\u0391-\u03a9\u0386\u0388\u0389\u038a\u038c\u038e\u038f\u03aa\u03ab\u0401-\u042f",
  lower_common: "\u03b1-\u03c9\u03ac\u03ad\u03ae\u03af\u03b0\u0430-\u045f",
  box:
    "\u2502\u250c\u2510\u2518\u251c\u2524\u252c\u253c\u2550-\u256c\u2580\u2584\u2588\u258c\u2590" +
    "\u2591\u2592\u2593",
};

// ftfy.chardata.UTF8_CLUES: regex character-class bodies (with ranges).
const UTF8_CLUES = {
  utf8_first_of_2:
    "\u0102\u00c2\u00c4\u0100\u00c5\u00c3\u00c6\u0106\u010c\u00c7\u010e\u0110\u00c9\u011a\u00ca\u00cb" +
    "\u0116\u00c8\u0112\u0118\u00d0\u011e\u0122\u00cd\u00ce\u00cf\u0130\u00cc\u012a\u0136\u0139\u013b" +
    "\u0141\u0143\u0147\u0145\u00d1\u00d3\u00d4\u00d6\u0150\u00d2\u014c\u00d8\u00d5\u0158\u015a\u0160" +
    "\u015e\u0162\u00de\u00da\u00db\u00dc\u0170\u00d9\u016a\u0172\u016e\u00dd\u0179\u017d\u017b\u00df" +
    "\u00d7\u0392\u0393\u0394\u0395\u0396\u0397\u0398\u0399\u039a\u039b\u039c\u039d\u039e\u039f\u03a0" +
    "\u03a1\u03a3\u03a4\u03a5\u03a6\u03a7\u03a8\u03a9\u03aa\u03ab\u03ac\u03ad\u03ae\u03af\u0412\u0413" +
    "\u0414\u0415\u0416\u0417\u0418\u0419\u041a\u041b\u041c\u041d\u041e\u041f\u0420\u0421\u0422\u0423" +
    "\u0424\u0425\u0426\u0427\u0428\u0429\u042a\u042b\u042c\u042d\u042e\u042f",
  utf8_first_of_3:
    "\u00e1\u0103\u00e2\u00e4\u00e0\u0101\u0105\u00e5\u00e3\u00e6\u0107\u010d\u00e7\u010f\u00e9\u011b" +
    "\u00ea\u00eb\u0117\u00e8\u0113\u0119\u0119\u0123\u00ed\u00ee\u00ef\u00ec\u012b\u012f\u0137\u013a" +
    "\u013c\u0155\u017a\u03b0\u03b1\u03b2\u03b3\u03b4\u03b5\u03b6\u03b7\u03b8\u03b9\u03ba\u03bb\u03bc" +
    "\u03bd\u03be\u03bf\u0430\u0431\u0432\u0433\u0434\u0435\u0436\u0437\u0438\u0439\u043a\u043b\u043c" +
    "\u043d\u043e\u043f",
  utf8_first_of_4: "\u0111\u00f0\u011f\u00f3\u0161\u03c0\u03c3\u0440\u0443",
  utf8_continuation:
    "\u0080-\u00bf \u0104\u00c6\u013d\u0141\u00d8\u0156\u015a\u0160\u015e\u0164\u0178\u0179" +
    "\u017d\u017b\u0152\u0105\u00e6\u0192\u013e\u0142\u00f8\u0157\u015b\u0161\u015f\u0165\u017a\u017e" +
    "\u017c\u0153\u02c6\u02c7\u02d8\u02db\u02dc\u02dd\u0384\u0385\u0386\u0388\u0389\u038a\u038c\u038e" +
    "\u038f\u0401\u0402\u0403\u0404\u0405\u0406\u0407\u0408\u0409\u040a\u040b\u040c\u040e\u040f\u0451" +
    "\u0452\u0453\u0454\u0455\u0456\u0457\u0458\u0459\u045a\u045b\u045c\u045e\u045f\u0490\u0491\u2013" +
    "\u2014\u2015\u2018\u2019\u201a\u201c\u201d\u201e\u2020\u2021\u2022\u2026\u2030\u2039\u203a\u20ac" +
    "\u2116\u2122",
  utf8_continuation_strict:
    "\u0080-\u00bf\u0104\u00c6\u013d\u0141\u00d8\u0156\u015a\u0160\u015e\u0164\u0178\u0179\u017d" +
    "\u017b\u0152\u0105\u00e6\u0192\u013e\u0142\u00f8\u0157\u015b\u0161\u015f\u0165\u017a\u017e\u017c" +
    "\u0153\u02c6\u02c7\u02d8\u02db\u02dc\u02dd\u0384\u0385\u0386\u0388\u0389\u038a\u038c\u038e\u038f" +
    "\u0401\u0402\u0403\u0404\u0405\u0406\u0407\u0408\u0409\u040a\u040b\u040c\u040e\u040f\u0451\u0452" +
    "\u0453\u0454\u0455\u0456\u0457\u0458\u0459\u045a\u045b\u045c\u045e\u045f\u0490\u0491\u2020\u2021" +
    "\u2030\u2039\u203a\u20ac\u2116\u2122",
};

// ftfy.chardata.LIGATURES
const LIGATURES = {
  "\u0132": "IJ", "\u0133": "ij", "\u0149": "\u02bcn", "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz",
  "\u01c4": "D\u017d", "\u01c5": "D\u017e", "\u01c6": "d\u017e", "\u01c7": "LJ", "\u01c8": "Lj",
  "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj", "\ufb00": "ff", "\ufb01": "fi",
  "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "\u017ft", "\ufb06": "st",
};
