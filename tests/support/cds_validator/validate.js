// Validate a CDS Hooks response with the CDS Hooks project's cds-validator.
// usage: node validate.js card|discovery FILE  ->  prints a JSON array of errors ([] when valid)
'use strict';
const fs = require('fs');
const validator = require('cds-validator');
const kind = { card: validator.Card, discovery: validator.DiscoveryResponse }[process.argv[2]];
if (!kind) { console.error('usage: node validate.js card|discovery FILE'); process.exit(2); }
kind(fs.readFileSync(process.argv[3], 'utf8'))
  .then(() => console.log('[]'))
  .catch((errors) => console.log(JSON.stringify(errors.map((e) => ({ property: e.property, message: e.message })))));
