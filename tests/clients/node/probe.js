// Drives gcp-metadata and google-auth-library against the metadata server the
// environment names (GCE_METADATA_HOST / GCE_METADATA_IP), the way an
// unmodified Node app would, and prints one JSON object on stdout.
//
// usage: node probe.js AUDIENCE [STORAGE_LIST_URL]
'use strict';

const gcpMetadata = require('gcp-metadata');
const {GoogleAuth} = require('google-auth-library');

async function main() {
  const [audience, storageUrl] = process.argv.slice(2);
  const out = {
    versions: {
      'gcp-metadata': require('gcp-metadata/package.json').version,
      'google-auth-library': require('google-auth-library/package.json').version,
    },
  };

  out.isAvailable = await gcpMetadata.isAvailable();
  out.zone = await gcpMetadata.instance('zone');
  out.email = await gcpMetadata.instance('service-accounts/default/email');

  const auth = new GoogleAuth({scopes: ['https://www.googleapis.com/auth/cloud-platform']});
  out.projectId = await auth.getProjectId();
  const client = await auth.getClient();
  out.clientKind = client.constructor.name;
  out.accessToken = await auth.getAccessToken();

  const idClient = await auth.getIdTokenClient(audience);
  out.idToken = await idClient.idTokenProvider.fetchIdToken(audience);

  if (storageUrl) {
    // An authorised API call: the library sets Authorization from the token it holds.
    const res = await client.request({url: storageUrl});
    out.storage = {status: res.status, names: (res.data.items || []).map(item => item.name)};
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch(err => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
