// A real llama.cpp (the prebuilt CPU binaries of the npm package node-llama-cpp) run on one GGUF file.
//
//   node tests/llama_cpp.mjs < job.json > answer.json
//
// The job (JSON on stdin) names the model and what to compute; every part is optional but `model`:
//   {"model": "m.gguf", "texts": ["..."],                  -> "tokens": the ids llama.cpp gives each text
//    "ids": [1, 2, 3], "logits_at": [0, 2],                -> "logits": its full logits after those positions
//    "greedy": {"ids": [...], "tokens": 64},               -> "greedy": the ids its argmax appends
//    "score": [[...], [...]],                              -> "nats": per window, -log p of each ids[i + 1]
//    "decode": {"ids": [...], "tokens": 64, "repeats": 3}, -> "decode_seconds": the fastest greedy decode
//    "threads": 1, "context": 256}
// The KV cache is float32, so a float32 file gives tinylm's logits to rounding. NODE_LLAMA_CPP_DIR is the folder
// `make test` installs node-llama-cpp into (npm install --prefix).
import path from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.NODE_LLAMA_CPP_DIR;
const {getLlama, LlamaLogLevel} = await import(
    pathToFileURL(path.join(dir, "node_modules", "node-llama-cpp", "dist", "index.js")).href
);

let input = "";
for await (const chunk of process.stdin) input += chunk;
const job = JSON.parse(input);

// build: "never" and gpu: false: only the prebuilt CPU binaries, nothing compiled or downloaded.
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false});
const model = await llama.loadModel({modelPath: job.model});
const answer = {vocabulary_type: model.vocabularyType};
if (job.texts) answer.tokens = job.texts.map((text) => Array.from(model.tokenize(text)));

const context = job.ids || job.greedy || job.score || job.decode
    ? await model.createContext({
          contextSize: job.context ?? 256,
          threads: job.threads ?? 1,
          flashAttention: false,
          experimentalKvCacheKeyType: "F32",
          experimentalKvCacheValueType: "F32",
      })
    : null;

const sequence = context?.getSequence();

// Logits after each position of `ids`, as requested, from an empty KV cache.
async function evaluateAll(ids, wanted) {
    await sequence.clearHistory();
    const items = ids.map((id, i) => (wanted(i) ? [id, {generateNext: {logits: true}}] : id));
    return await sequence.controlledEvaluate(items);
}

function logitRow(map) {
    const row = new Array(map.size);
    for (const [token, logit] of map) row[token] = logit;
    return row;
}

if (job.ids) {
    const at = new Set(job.logits_at ?? job.ids.map((_, i) => i));
    const results = await evaluateAll(job.ids, (i) => at.has(i));
    answer.logits = [...at].map((i) => logitRow(results[i].next.logits));
}

// Each window read from an empty cache: the nats of each token after the ones before it in its window.
if (job.score) {
    answer.nats = [];
    for (const ids of job.score) {
        const results = await evaluateAll(ids.slice(0, -1), () => true);
        answer.nats.push(
            results.map((result, i) => {
                const logits = [...result.next.logits.values()];
                const max = logits[0]; // the map is sorted, highest first
                const logSumExp = max + Math.log(logits.reduce((sum, x) => sum + Math.exp(x - max), 0));
                return logSumExp - result.next.logits.get(ids[i + 1]);
            }),
        );
    }
}

async function greedy(ids, tokens) {
    await sequence.clearHistory();
    const out = [];
    for await (const token of sequence.evaluate(ids, {temperature: 0, yieldEogToken: true})) {
        out.push(token);
        if (out.length === tokens) break;
    }
    return out;
}

if (job.greedy) answer.greedy = await greedy(job.greedy.ids, job.greedy.tokens);

if (job.decode) {
    let best = Infinity;
    for (let round = 0; round < (job.decode.repeats ?? 3); round++) {
        const start = process.hrtime.bigint();
        const out = await greedy(job.decode.ids, job.decode.tokens);
        const seconds = Number(process.hrtime.bigint() - start) / 1e9;
        if (out.length !== job.decode.tokens) throw new Error(`decoded ${out.length} tokens, not ${job.decode.tokens}`);
        best = Math.min(best, seconds);
    }
    answer.decode_seconds = best;
}

process.stdout.write(JSON.stringify(answer));
await context?.dispose();
await model.dispose();
await llama.dispose();
