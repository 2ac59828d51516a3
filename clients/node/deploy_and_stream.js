#!/usr/bin/env node
// gpufleet from Node.js: create a deployment on the control plane, then stream tokens from
// it through a gateway with Triton's ModelStreamInfer.
//
// Plain JavaScript on @grpc/grpc-js + @grpc/proto-loader (installed by `npm install` at the
// repository root); the .proto files are read at run time from protos/, so no generated
// code is needed.
//
//   node clients/node/deploy_and_stream.js --server 127.0.0.1:50051 --token "$ADMIN_TOKEN" \
//       --gateway 127.0.0.1:8001 --name tokens --prompt "hello from node" --max-tokens 6
//
// The deployment runs the repository's example model server (`python -m
// examples.model_server`), serving the `tokens` model under the deployment's name, with
// min_instances 0: the streaming call itself starts the instance and waits for it in the
// gateway's queue.
//
// stdout: one JSON object (the created deployment and what the stream returned); stderr:
// progress and errors. Exit status: 0 ok, 1 a call failed, 2 bad arguments.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const ROUTE_TARGET_KEY = 'deploy-route-target';
const FINAL_RESPONSE_PARAMETER = 'triton_final_response';
const EXIT_CALL_FAILED = 1;
const EXIT_USAGE = 2;
// A new deployment reaches the gateway's routing table a moment after CreateDeployment
// returns; until then the gateway answers NOT_FOUND, and the call is simply retried.
const NOT_FOUND_RETRY_MS = 200;

const USAGE = `usage: node clients/node/deploy_and_stream.js [options]

  --server HOST:PORT   control plane (default: $GPUFLEET_SERVER, else 127.0.0.1:50051)
  --token TOKEN        admin token (default: $GPUFLEET_TOKEN)
  --gateway HOST:PORT  gateway (default: $GPUFLEET_GATEWAY, else 127.0.0.1:8001)
  --name NAME          deployment to create (default: tokens)
  --prompt TEXT        words to generate tokens from (default: "hello from node")
  --max-tokens N       tokens to generate (default: 6)
  --timeout SECONDS    deadline of the whole run, instance start included (default: 60)`;

class UsageError extends Error {}
class HelpRequested extends Error {}

class CallError extends Error {
  constructor(call, error) {
    super(`${call} failed: ${grpc.status[error.code] || error.code}: ${error.details || error.message}`);
    this.call = call;
    this.code = grpc.status[error.code] || String(error.code);
    this.details = error.details || error.message;
  }
}

function parseArgs(argv, env) {
  const options = {
    server: env.GPUFLEET_SERVER || '127.0.0.1:50051',
    token: env.GPUFLEET_TOKEN || '',
    gateway: env.GPUFLEET_GATEWAY || '127.0.0.1:8001',
    name: 'tokens',
    prompt: 'hello from node',
    maxTokens: 6,
    timeoutSeconds: 60,
  };
  const flags = {
    '--server': (v) => { options.server = v; },
    '--token': (v) => { options.token = v; },
    '--gateway': (v) => { options.gateway = v; },
    '--name': (v) => { options.name = v; },
    '--prompt': (v) => { options.prompt = v; },
    '--max-tokens': (v) => { options.maxTokens = positiveInteger('--max-tokens', v); },
    '--timeout': (v) => { options.timeoutSeconds = positiveInteger('--timeout', v); },
  };
  for (let i = 0; i < argv.length; i += 1) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    if (flag === '--help' || flag === '-h') throw new HelpRequested(USAGE);
    const apply = flags[flag];
    if (apply === undefined) throw new UsageError(`unknown argument ${argv[i]}\n\n${USAGE}`);
    const value = inline !== undefined ? inline : argv[++i];
    if (value === undefined) throw new UsageError(`${flag} needs a value`);
    apply(value);
  }
  if (!options.token) {
    throw new UsageError('no admin token: pass --token or set $GPUFLEET_TOKEN (the control '
      + 'plane writes it to <state dir>/admin-token on first start)');
  }
  return options;
}

function positiveInteger(flag, text) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) {
    throw new UsageError(`${flag} must be a whole number of at least 1, got ${JSON.stringify(text)}`);
  }
  return value;
}

function loadServices() {
  const definition = protoLoader.loadSync(
    ['gpufleet/v1/deployment_service.proto', 'gpufleet/inference/grpc_service.proto'],
    { includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: false, oneofs: true },
  );
  const loaded = grpc.loadPackageDefinition(definition);
  return { DeploymentService: loaded.gpufleet.v1.DeploymentService, Inference: loaded.inference.GRPCInferenceService };
}

function bearer(token) {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

function tokensDeployment(name) {
  return {
    name,
    labels: { example: 'node-client' },
    spec: {
      // $PORT is set by the agent; --model serves the tokens model under this deployment's name.
      command: `python -m examples.model_server --port $PORT --model ${name}=tokens --token-delay-ms 20`,
      port: 0,
      gpu: { memory_mib: 4096, core_percent: 25 },
      scaling: { min_instances: 0, max_instances: 1, idle_retention: { seconds: 30 } },
      traffic: { max_request_concurrency: 2 },
      readiness_probe: { grpc: {}, period: { seconds: 0, nanos: 500000000 } },
    },
  };
}

function createDeployment(client, token, deployment, deadline) {
  return new Promise((resolve, reject) => {
    client.CreateDeployment({ deployment }, bearer(token), { deadline }, (error, response) => {
      if (error) reject(new CallError('CreateDeployment', error));
      else resolve(response);
    });
  });
}

function tokensRequest(name, prompt, maxTokens) {
  return {
    model_name: name,
    id: 'node-1',
    inputs: [
      { name: 'PROMPT', datatype: 'BYTES', shape: [1], contents: { bytes_contents: [Buffer.from(prompt)] } },
      { name: 'MAX_TOKENS', datatype: 'INT32', shape: [1], contents: { int_contents: [maxTokens] } },
    ],
  };
}

// The elements of a BYTES output: typed contents, or raw 4-byte length-prefixed elements.
function bytesElements(response, index) {
  const output = response.outputs[index];
  const raw = response.raw_output_contents || [];
  if (raw.length > 0) {
    const data = raw[index];
    const elements = [];
    for (let offset = 0; offset + 4 <= data.length;) {
      const length = data.readUInt32LE(offset);
      elements.push(data.subarray(offset + 4, offset + 4 + length));
      offset += 4 + length;
    }
    return elements;
  }
  return (output.contents && output.contents.bytes_contents) || [];
}

function isFinal(response) {
  const parameter = (response.parameters || {})[FINAL_RESPONSE_PARAMETER];
  return Boolean(parameter && parameter.bool_param);
}

// One ModelStreamInfer call: one request, then the half-close; resolves with the tokens.
function streamOnce(client, invokeToken, request, deadline) {
  return new Promise((resolve, reject) => {
    const result = { route_target: '', tokens: [], responses: 0, final: false };
    let settled = false;
    const finish = (error) => {
      if (settled) return;
      settled = true;
      if (error) reject(error);
      else resolve(result);
    };
    const call = client.ModelStreamInfer(bearer(invokeToken), { deadline });
    call.on('metadata', (metadata) => {
      const target = metadata.get(ROUTE_TARGET_KEY);
      if (target.length > 0) result.route_target = String(target[0]);
    });
    call.on('data', (message) => {
      if (message.error_message) {
        finish(new CallError('ModelStreamInfer', { code: grpc.status.UNKNOWN, details: `model error: ${message.error_message}` }));
        call.cancel();
        return;
      }
      const response = message.infer_response;
      result.responses += 1;
      response.outputs.forEach((output, index) => {
        if (output.datatype === 'BYTES') {
          for (const element of bytesElements(response, index)) {
            const token = element.toString('utf8');
            result.tokens.push(token);
            process.stderr.write(`${token} `);
          }
        }
      });
      if (isFinal(response)) result.final = true;
    });
    call.on('error', (error) => finish(Object.assign(new CallError('ModelStreamInfer', error), { grpcCode: error.code })));
    call.on('end', () => finish(null));
    call.write(request);
    call.end();
  });
}

async function streamTokens(client, invokeToken, request, deadline) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      const result = await streamOnce(client, invokeToken, request, deadline);
      process.stderr.write('\n');
      return { ...result, attempts: attempt };
    } catch (error) {
      const retry = error.grpcCode === grpc.status.NOT_FOUND && Date.now() + NOT_FOUND_RETRY_MS < deadline.getTime();
      if (!retry) throw error;
      await new Promise((resolve) => { setTimeout(resolve, NOT_FOUND_RETRY_MS); });
    }
  }
}

async function main(argv, env) {
  const options = parseArgs(argv, env);
  const deadline = new Date(Date.now() + options.timeoutSeconds * 1000);
  const { DeploymentService, Inference } = loadServices();
  const controlPlane = new DeploymentService(options.server, grpc.credentials.createInsecure());
  const gateway = new Inference(options.gateway, grpc.credentials.createInsecure());
  try {
    const created = await createDeployment(controlPlane, options.token, tokensDeployment(options.name), deadline);
    process.stderr.write(`created deployment/${created.deployment.name} (revision ${created.deployment.revision}); streaming through ${options.gateway}\n`);
    const stream = await streamTokens(gateway, created.invoke_token, tokensRequest(options.name, options.prompt, options.maxTokens), deadline);
    return {
      deployment: {
        name: created.deployment.name,
        revision: created.deployment.revision,
        generation: created.deployment.generation,
      },
      invoke_token_issued: Boolean(created.invoke_token),
      stream,
    };
  } finally {
    controlPlane.close();
    gateway.close();
  }
}

main(process.argv.slice(2), process.env).then(
  (summary) => {
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  },
  (error) => {
    if (error instanceof HelpRequested) {
      process.stdout.write(`${error.message}\n`);
      return;
    }
    if (error instanceof UsageError) {
      process.stderr.write(`${error.message}\n`);
      process.exitCode = EXIT_USAGE;
      return;
    }
    const report = error instanceof CallError
      ? { call: error.call, code: error.code, details: error.details }
      : { details: String(error && error.stack ? error.stack : error) };
    process.stderr.write(`${JSON.stringify({ error: report })}\n`);
    process.exitCode = EXIT_CALL_FAILED;
  },
);
