// A webhook receiver for `pipeq gateway`, verifying Standard Webhooks signatures by hand
// (node:crypto only; the `standardwebhooks` npm package does the same).
//   PIPEQ_WEBHOOK_SECRET=whsec_... node examples/webhook_receiver.mjs 9000
import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";

const secret = Buffer.from(process.env.PIPEQ_WEBHOOK_SECRET.replace(/^whsec_/, ""), "base64");
const seen = new Set(); // webhook-id: deliveries are at least once, so dedupe

export function verify(headers, body, now = Date.now() / 1000) {
  const id = headers["webhook-id"], timestamp = headers["webhook-timestamp"];
  if (!id || !timestamp || Math.abs(now - Number(timestamp)) > 300) return false;
  const expected = createHmac("sha256", secret).update(`${id}.${timestamp}.${body}`).digest();
  return (headers["webhook-signature"] || "").split(" ").some((sig) => {
    const [version, value] = sig.split(",");
    const got = Buffer.from(value || "", "base64");
    return version === "v1" && got.length === expected.length && timingSafeEqual(got, expected);
  });
}

createServer((req, res) => {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    if (!verify(req.headers, body)) { res.writeHead(401).end(); return; }
    if (!seen.has(req.headers["webhook-id"])) {
      seen.add(req.headers["webhook-id"]);
      const event = JSON.parse(body);
      console.log(JSON.stringify({ type: event.type, id: event.data.id, result: event.data.result }));
    }
    res.writeHead(204).end();
  });
}).listen(Number(process.argv[2] || 9000), "127.0.0.1");
