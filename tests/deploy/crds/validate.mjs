// Reads a JSON array of Kubernetes documents on stdin and validates each against the validator
// generated from its operator's CRD (kubernetes-models); prints {"errors": ["Kind/name: ...", ...]}.
// A kind without a validator is an error, never a pass.
const PACKAGES = {
  "cert-manager.io": "@kubernetes-models/cert-manager",
  "postgresql.cnpg.io": "@kubernetes-models/cloudnative-pg",
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const errors = [];
for (const document of JSON.parse(input)) {
  const where = `${document.kind}/${document.metadata?.name}`;
  const [group, version] = String(document.apiVersion).split("/");
  const pkg = PACKAGES[group];
  if (!pkg || !version) {
    errors.push(`${where}: no CRD validator for ${document.apiVersion}`);
    continue;
  }
  let model;
  try {
    model = (await import(`${pkg}/${group}/${version}/${document.kind}`))[document.kind];
  } catch {
    errors.push(`${where}: no CRD validator for ${document.apiVersion} ${document.kind}`);
    continue;
  }
  try {
    new model(document).validate();
  } catch (error) {
    errors.push(`${where}: ${error.message}`);
  }
}
process.stdout.write(JSON.stringify({ errors }));
