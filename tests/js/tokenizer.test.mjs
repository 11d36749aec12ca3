// distill/web/tokenizer.js must give exactly distill/tokenizer_np.py's ids on every text of a
// fixture written by tools/tokenizer_fixture.py (tests/test_js_tokenizer.py builds one and runs this).
// Usage: TOKENIZER_FIXTURE=OUT_DIR/tokenizer_fixture.json node --test tests/js/tokenizer.test.mjs
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import path from "node:path";
import { test } from "node:test";

// Node < 20.19 (Debian 12 ships 18) reads a .js file outside a "type": "module" package as CommonJS,
// and the module is a plain .js for browsers: import its source as an ES module via a data: URL.
const source = await readFile(new URL("../../distill/web/tokenizer.js", import.meta.url));
const { loadTokenizer } = await import(`data:text/javascript;base64,${source.toString("base64")}`);

const fixturePath = process.env.TOKENIZER_FIXTURE;

async function load() {
  assert.ok(fixturePath, "set TOKENIZER_FIXTURE to a fixture: .venv/bin/python tools/tokenizer_fixture.py OUT_DIR");
  const fixture = JSON.parse(await readFile(fixturePath, "utf8"));
  const dir = path.resolve(path.dirname(fixturePath), fixture.tokenizer_dir);
  // the bundle's tokenizer/ folder read the way a page would fetch it: tokenizer.json, then the gz vocabulary
  const tokenizer = await loadTokenizer(async (name) => {
    try {
      return await readFile(path.join(dir, name));
    } catch (e) {
      if (e.code === "ENOENT") return null;
      throw e;
    }
  });
  return { fixture, tokenizer, dir };
}

test("ids equal tokenizer_np's on every fixture text", async (t) => {
  const { fixture, tokenizer } = await load();
  assert.equal(tokenizer.contextLength, fixture.context_length);
  const groupOf = fixture.groups.flatMap(([name, count]) => Array(count).fill(name));
  const started = performance.now();
  const got = tokenizer.tokenize(fixture.texts);
  const ms = performance.now() - started;
  const mismatches = [];
  got.forEach((row, i) => {
    if (row.join(",") !== fixture.ids[i].join(",")) mismatches.push(i);
  });
  const n = fixture.texts.length;
  const same = n - mismatches.length;
  t.diagnostic(`exact match: ${same}/${n} texts (${((100 * same) / n).toFixed(3)}%) in ${ms.toFixed(0)} ms`);
  // character properties come from each side's own Unicode tables: an older JS engine cannot know newer characters
  t.diagnostic(`Unicode: node ${process.versions.unicode}, Python unicodedata ${fixture.unicode_version}`);
  for (const i of mismatches.slice(0, 20)) {
    t.diagnostic(`mismatch [${groupOf[i]} #${i}] ${JSON.stringify(fixture.texts[i])}`);
    t.diagnostic(`  expected ${fixture.ids[i].filter((x) => x).join(",")}`);
    t.diagnostic(`  got      ${got[i].filter((x) => x).join(",")}`);
  }
  assert.equal(mismatches.length, 0, `${mismatches.length} of ${n} texts tokenized differently`);
});

test("int64 output and a shorter context keep the truncation rule", async () => {
  const { fixture, tokenizer } = await load();
  const texts = fixture.texts.slice(0, 3);
  const { data, dims } = tokenizer.tokenizeInt64(texts);
  assert.deepEqual(dims, [3, fixture.context_length]);
  assert.deepEqual(Array.from(data, Number), fixture.ids.slice(0, 3).flat());
  const row = tokenizer.tokenize("word ".repeat(50), 8)[0];
  assert.deepEqual([row.length, row[0], row[7]], [8, tokenizer.sotTokenId, tokenizer.eotTokenId]);
});

test("loads a bundle's tokenizer folder over HTTP, as a page does", async () => {
  const { fixture, dir } = await load();
  const server = createServer(async (req, res) => {
    try {
      res.end(await readFile(path.join(dir, path.basename(new URL(req.url, "http://x").pathname))));
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const tokenizer = await loadTokenizer(`http://127.0.0.1:${server.address().port}/tokenizer/`);
    assert.deepEqual(tokenizer.tokenize(fixture.texts.slice(0, 50)), fixture.ids.slice(0, 50));
  } finally {
    server.close();
  }
});
