#!/usr/bin/env node
// A Node.js client of manatee.memory.v1.MemoryService, generated at run time from protos/.
//
// It walks the whole API once against a running server and prints each step:
//   stats, a manual start (PrepareVm, FinishAddVm, RemoveVm), a rebalance, a LaunchVm stream
//   to `launched`, a watch (two snapshots, then cancel) and a rich error decoded.
//
//   npm ci                                   # in examples/node/, from package-lock.json
//   node journey.js 127.0.0.1:50051          # or unix:///run/manatee.sock
//
// Any failure prints `journey failed: ...` and exits 1. The server must have room for a 512 MiB
// VM and no other pending start (the embedded simulator of `make run` has both).
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// Every .proto a client needs is in the repo's protos/: ours and googleapis' google/rpc ones.
const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const MEMORY_SERVICE_PROTO = 'manatee/memory/v1/memory_service.proto';

// The options that make proto-loader agree with the contract. Its defaults do not:
const LOADER_OPTIONS = {
  // Field names exactly as in the .proto. Without it proto-loader renames fields to camelCase,
  // and a request object written with the proto's names (`mem_size_bytes`) has its fields
  // silently dropped: the server then sees 0 ("mem_size_bytes: must be positive").
  keepCase: true,
  // int64 (every byte count and VM id) as decimal strings. The default is a Long object, and a
  // JS number cannot hold every int64 exactly. Requests accept strings (or small numbers).
  longs: String,
  // Enums by name ("VM_STATE_RUNNING") rather than by number.
  enums: String,
  // Fields at their default value are present. proto3 does not send zeros, so without it
  // VM 0's `vm_id` (the CrOS guest) and `fully_applied: false` are simply absent.
  defaults: true,
  // A oneof's set member is named in a virtual field (`event: 'reserved'`), so a stream's
  // messages can be dispatched with a switch.
  oneofs: true,
  includeDirs: [PROTOS],
};

// The same choices for decoding google.rpc.Status from `grpc-status-details-bin`.
const TO_OBJECT_OPTIONS = {longs: String, enums: String, defaults: true, oneofs: true};

const MIB = 1024 * 1024;
const VM_MEM_SIZE_BYTES = 512 * MIB;
const REBALANCE_DELTA_BYTES = 64 * MIB;
const WATCH_SNAPSHOTS = 2;
const CALL_TIMEOUT_MS = 30_000;

function loadClient(address) {
  const definition = protoLoader.loadSync(MEMORY_SERVICE_PROTO, LOADER_OPTIONS);
  const {MemoryService} = grpc.loadPackageDefinition(definition).manatee.memory.v1;
  // A device-local service: never route it through an HTTP proxy from the environment.
  return new MemoryService(address, grpc.credentials.createInsecure(), {
    'grpc.enable_http_proxy': 0,
  });
}

function deadline() {
  return new Date(Date.now() + CALL_TIMEOUT_MS);
}

// A unary call as a promise.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, {deadline: deadline()}, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function mib(bytes) {
  return `${Number(BigInt(bytes) / BigInt(MIB))} MiB`;
}

// --- rich errors: google.rpc.Status in the grpc-status-details-bin trailer -------------------

const richErrorTypes = new protobuf.Root();
// Imports resolve against protos/; google/protobuf/any.proto is bundled with protobufjs.
richErrorTypes.resolvePath = (origin, target) => path.join(PROTOS, target);
richErrorTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], {
  keepCase: true,
});
const StatusType = richErrorTypes.lookupType('google.rpc.Status');

// The rich error of a failed call: {code, message, details: [{type, ...fields}]}, or null.
function decodeRichError(error) {
  const [serialized] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!serialized) {
    return null;
  }
  const status = StatusType.toObject(StatusType.decode(serialized), TO_OBJECT_OPTIONS);
  const details = status.details.map((any) => {
    // type_url is "type.googleapis.com/google.rpc.ErrorInfo": the type is after the last '/'.
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = richErrorTypes.lookupType(typeName);
    return {type: typeName, ...type.toObject(type.decode(any.value), TO_OBJECT_OPTIONS)};
  });
  return {code: status.code, message: status.message, details};
}

// Prints the decoded details with `log` (console.log or console.error); returns them.
function printRichError(error, log = console.log) {
  const rich = decodeRichError(error);
  if (rich === null) {
    throw new Error(`no grpc-status-details-bin on ${grpc.status[error.code]}: ${error.details}`);
  }
  log(`  status: ${grpc.status[rich.code]} (${rich.code}): ${rich.message}`);
  for (const detail of rich.details) {
    switch (detail.type) {
      case 'google.rpc.ErrorInfo':
        // A map: its order on the wire is arbitrary, so print it sorted.
        log(
          `  ErrorInfo: reason ${detail.reason}, domain ${detail.domain}, metadata ` +
            Object.keys(detail.metadata)
              .sort()
              .map((key) => `${key}=${detail.metadata[key]}`)
              .join(' '),
        );
        break;
      case 'google.rpc.BadRequest':
        for (const violation of detail.field_violations) {
          log(`  BadRequest: ${violation.field}: ${violation.description}`);
        }
        break;
      case 'google.rpc.RetryInfo':
        log(`  RetryInfo: retry in ${JSON.stringify(detail.retry_delay)}`);
        break;
      default:
        log(`  ${detail.type}: ${JSON.stringify(detail)}`);
    }
  }
  return rich;
}

// --- the journey --------------------------------------------------------------------------

async function balloonStats(client) {
  const stats = await call(client, 'GetBalloonStats', {});
  const byVm = stats.stats.map((vm) => `VM ${vm.vm_id}: balloon ${mib(vm.balloon_actual_bytes)}`);
  console.log(`GetBalloonStats: session ${stats.session}; ${byVm.join(', ')}`);
  if (!stats.stats.some((vm) => vm.vm_id === '0')) {
    throw new Error('GetBalloonStats has no entry for the CrOS guest (VM 0)');
  }
  return stats;
}

async function manualStartAndRebalance(client) {
  const prepared = await call(client, 'PrepareVm', {mem_size_bytes: String(VM_MEM_SIZE_BYTES)});
  console.log(
    `PrepareVm: VM ${prepared.vm_id} reserved=${prepared.reserved}, ` +
      `balloon control ${prepared.balloon_control_path}`,
  );
  const vmId = prepared.vm_id;
  try {
    if (!prepared.reserved) {
      throw new Error(`PrepareVm fell short by ${prepared.shortfall_bytes} bytes`);
    }
    // Here a real caller starts crosvm with --balloon-control <balloon_control_path>.
    const finished = await call(client, 'FinishAddVm', {vm_id: vmId, session: prepared.session});
    console.log(`FinishAddVm: VM ${finished.vm.vm_id} is ${finished.vm.state}`);

    const rebalanced = await call(client, 'RebalanceMemory', {
      deltas: [{vm_id: vmId, delta_bytes: String(REBALANCE_DELTA_BYTES)}],
      session: prepared.session,
    });
    const moved = rebalanced.actual_deltas.map((d) => `VM ${d.vm_id} ${d.delta_bytes} bytes`);
    console.log(
      `RebalanceMemory: inflate VM ${vmId} by ${mib(REBALANCE_DELTA_BYTES)}: ` +
        `applied ${moved.join(', ')}; fully_applied=${rebalanced.fully_applied}`,
    );
  } finally {
    // RemoveVm also releases a start that was only prepared.
    await call(client, 'RemoveVm', {vm_id: vmId, session: prepared.session});
    console.log(`RemoveVm: VM ${vmId} removed`);
  }
}

// LaunchVm: send `start`; on `reserved` start crosvm and send `vm_started`; the server answers
// `launched` and ends the stream with OK. If the server sends `stop_vm`, stop the VM and answer
// `vm_stopped`; the stream then ends with an error status.
function launchVm(client) {
  return new Promise((resolve, reject) => {
    const stream = client.LaunchVm({deadline: deadline()});
    let launched = null;
    stream.on('data', (message) => {
      switch (message.event) {
        case 'queued':
          // Another start is pending on the device: this launch waits its turn (1: next).
          console.log(`LaunchVm: queued at position ${message.queued.position}`);
          break;
        case 'progress':
          console.log(
            `LaunchVm: attempt ${message.progress.attempt} short by ` +
              `${mib(message.progress.shortfall_bytes)}`,
          );
          break;
        case 'reserved':
          console.log(
            `LaunchVm: reserved VM ${message.reserved.vm_id}; start crosvm with ` +
              `--balloon-control ${message.reserved.balloon_control_path}`,
          );
          // A real launcher spawns crosvm here and reports whether it started.
          stream.write({vm_started: {}});
          // Half-closing after `vm_started` is a normal end of the client's side.
          stream.end();
          break;
        case 'stop_vm':
          console.log(`LaunchVm: stop VM ${message.stop_vm.vm_id}: ${message.stop_vm.reason}`);
          stream.write({vm_stopped: {}});
          break;
        case 'launched':
          launched = message.launched;
          console.log(`LaunchVm: launched VM ${launched.vm_id}, ${launched.vm.state}`);
          break;
        default:
          stream.cancel(); // the server then releases whatever it reserved
          reject(new Error(`LaunchVm: unexpected message ${JSON.stringify(message)}`));
      }
    });
    // A status other than OK arrives as 'error'; 'end' comes after every message was read.
    stream.on('error', reject);
    stream.on('end', () => {
      if (launched === null) {
        reject(new Error('LaunchVm ended without `launched`'));
      } else {
        resolve(launched);
      }
    });
    stream.write({start: {mem_size_bytes: String(VM_MEM_SIZE_BYTES)}});
  });
}

// A watch streams until cancelled: read a few snapshots, then cancel. The cancel surfaces as
// an 'error' event with CANCELLED, which is the expected end here.
function watchBalloonStats(client) {
  return new Promise((resolve, reject) => {
    const stream = client.WatchBalloonStats(
      {interval: {seconds: '0', nanos: 200_000_000}},
      {deadline: deadline()},
    );
    let snapshots = 0;
    stream.on('data', (message) => {
      if (message.event !== 'snapshot') {
        const event = JSON.stringify(message[message.event]);
        console.log(`WatchBalloonStats: ${message.event}: ${event}`);
        return;
      }
      snapshots += 1;
      const vmIds = message.snapshot.stats.map((vm) => vm.vm_id);
      console.log(`WatchBalloonStats: snapshot ${snapshots}: VMs ${vmIds.join(', ')}`);
      if (snapshots === WATCH_SNAPSHOTS) {
        stream.cancel();
      }
    });
    stream.on('error', (error) => {
      if (error.code === grpc.status.CANCELLED && snapshots === WATCH_SNAPSHOTS) {
        console.log(`WatchBalloonStats: cancelled after ${snapshots} snapshots`);
        resolve(snapshots);
      } else {
        reject(error);
      }
    });
    stream.on('end', () => reject(new Error('WatchBalloonStats ended by itself')));
  });
}

async function richError(client) {
  console.log('PrepareVm with mem_size_bytes 0 (bad on purpose):');
  try {
    await call(client, 'PrepareVm', {mem_size_bytes: '0'});
  } catch (error) {
    const rich = printRichError(error);
    if (rich.code !== grpc.status.INVALID_ARGUMENT) {
      throw error;
    }
    return;
  }
  throw new Error('PrepareVm with mem_size_bytes 0 succeeded');
}

async function main(argv) {
  if (argv.length !== 1) {
    console.error('usage: node journey.js ADDRESS   (host:port or unix:///path)');
    return 2;
  }
  const client = loadClient(argv[0]);
  try {
    await balloonStats(client);
    await manualStartAndRebalance(client);
    const launched = await launchVm(client);
    await watchBalloonStats(client);
    await call(client, 'RemoveVm', {vm_id: launched.vm_id, session: launched.session});
    console.log(`RemoveVm: VM ${launched.vm_id} removed`);
    await richError(client);
    const listed = await call(client, 'ListVms', {});
    console.log(`ListVms: ${listed.vms.map((vm) => vm.vm_id).join(', ')}`);
  } finally {
    client.close();
  }
  console.log('journey done');
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    const name = error.code === undefined ? '' : `${grpc.status[error.code]}: `;
    console.error(`journey failed: ${name}${error.details || error.message}`);
    if (error.code !== undefined && decodeRichError(error) !== null) {
      printRichError(error, console.error);
    }
    process.exitCode = 1;
  },
);
