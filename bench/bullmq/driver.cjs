// The BullMQ side of bench/bullmq.py: one Node process, driven over stdin/stdout one JSON line at a time, so
// that the Python harness resets and reads the server's statistics around exactly the phase it measures.
//
//   node driver.cjs PORT MODE N CONCURRENCY      (MODE: cycle | throughput; NODE_PATH = the pinned install)
//
// It prints {"event":"ready","shas":{sha: script name}} once connected and warmed up, then for each phase
// waits for a line "go" and prints {"event": <phase>, "seconds": <wall time>} when the phase is over:
//   cycle:      "added" (N x await queue.add), then "processed" (a Worker at CONCURRENCY runs the N no-op jobs),
//               then "trickled" (an idle Worker wakes for each of N jobs added one at a time: moveToActive's path);
//               the three phases twice (the harness logs every command in the first pass, times the second)
//   throughput: "added" (queue.addBulk of N, not measured), then "processed" (as above, timed)
"use strict";
const crypto = require("crypto");
const readline = require("readline");
const { Queue, Worker } = require("bullmq");
const scripts = require("bullmq/dist/cjs/scripts");

const [port, mode, n, concurrency] = [Number(process.argv[2]), process.argv[3], Number(process.argv[4]),
  Number(process.argv[5])];
const connection = { host: "127.0.0.1", port, maxRetriesPerRequest: null };
const QUEUE = "clawq-bench";
const lines = readline.createInterface({ input: process.stdin });
const waiting = [];
lines.on("line", (line) => { const next = waiting.shift(); if (next) next(line.trim()); });
const go = () => new Promise((resolve) => waiting.push(resolve));
const say = (doc) => process.stdout.write(JSON.stringify(doc) + "\n");

function shas() {
  const out = {};
  for (const script of Object.values(scripts)) {
    if (script && typeof script.content === "string") {
      out[crypto.createHash("sha1").update(script.content).digest("hex")] = script.name;
    }
  }
  return out;
}

async function runJobs(count, conc) {
  let done = 0;
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  const worker = new Worker(QUEUE, async () => null, {
    connection, concurrency: conc, autorun: false, removeOnComplete: { count: 0 }, skipStalledCheck: false,
  });
  worker.on("completed", () => { done += 1; if (done === count) finish(); });
  await worker.waitUntilReady();
  const start = process.hrtime.bigint();
  worker.run();
  await finished;
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  await worker.close();
  return seconds;
}

async function trickle(queue, count) {
  let next;
  const worker = new Worker(QUEUE, async () => null, { connection, concurrency: 1 });
  worker.on("completed", () => next());
  await worker.waitUntilReady();
  const start = process.hrtime.bigint();
  for (let i = 0; i < count; i++) {
    const done = new Promise((resolve) => { next = resolve; });
    await queue.add("noop", { i });
    await done;
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  await worker.close();
  return seconds;
}

async function main() {
  const queue = new Queue(QUEUE, { connection, defaultJobOptions: { removeOnComplete: { count: 0 } } });
  await queue.waitUntilReady();
  for (let i = 0; i < 20; i++) await queue.add("warm", {});          // load every script the cycle uses
  await runJobs(20, 1);
  say({ event: "ready", shas: shas() });
  for (let pass = 0; pass < (mode === "cycle" ? 2 : 1); pass++) {
    await go();
    const start = process.hrtime.bigint();
    if (mode === "cycle") {
      for (let i = 0; i < n; i++) await queue.add("noop", { i });
    } else {
      const jobs = Array.from({ length: n }, (_, i) => ({ name: "noop", data: { i } }));
      for (let i = 0; i < jobs.length; i += 1000) await queue.addBulk(jobs.slice(i, i + 1000));
    }
    say({ event: "added", seconds: Number(process.hrtime.bigint() - start) / 1e9 });
    await go();
    say({ event: "processed", seconds: await runJobs(n, concurrency) });
    if (mode === "cycle") {
      await go();
      say({ event: "trickled", seconds: await trickle(queue, n) });
    }
  }
  await queue.close();
  lines.close();
}

main().catch((err) => { say({ event: "error", message: String(err && err.stack || err) }); process.exit(1); });
