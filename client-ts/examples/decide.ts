/**
 * Calls a decision server with the TypeScript client: Decides (`--decides`, 1) and a
 * DecideBatch, each with the caller's W3C trace context. Prints one JSON line an answer.
 *
 *   node dist/examples/decide.js --target 127.0.0.1:50051
 */
import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";

import { DecisionClient, Decision, Side, Source, type DecideResponse } from "../src/client.js";

const { values } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    "timeout-ms": { type: "string", default: "1000" },
    decides: { type: "string", default: "1" },
  },
});
const timeoutMs = Number(values["timeout-ms"]);

function trace(): { traceId: string; traceparent: string } {
  const traceId = randomBytes(16).toString("hex");
  return { traceId, traceparent: `00-${traceId}-${randomBytes(8).toString("hex")}-01` };
}

function print(call: string, response: DecideResponse, traceId: string): void {
  console.log(
    JSON.stringify({
      call,
      request_id: response.requestId,
      decision_id: response.decisionId,
      decision: Decision[response.decision],
      source: Source[response.source],
      trace_id: traceId,
    }),
  );
}

const client = new DecisionClient(values.target!);
try {
  await client.waitReady(5000);
  const order = { symbol: "BTC-USD", side: Side.BUY, quantity: 1 };
  for (let i = 1; i <= Number(values.decides); i++) {
    const { traceId, traceparent } = trace();
    print("decide", await client.decide({ ...order, requestId: `t-${i}` }, { timeoutMs, traceparent }), traceId);
  }
  const { traceId, traceparent } = trace();
  const batch = await client.decideBatch(
    [{ ...order, requestId: "b-1" }, { ...order, requestId: "b-2", symbol: "ETH-USD" }],
    { timeoutMs, traceparent },
  );
  for (const response of batch) print("decide_batch", response, traceId);
} finally {
  client.close();
}
