// Submit a job to `pipeq gateway` with Node's fetch and print its result as JSON.
//   node examples/gateway_client.mjs http://127.0.0.1:8080 "$SECRET" text-classification MODEL "I love it"
const [base, secret, task, model, text] = process.argv.slice(2);

const reply = await fetch(`${base}/v1/jobs?wait=30`, {
  method: "POST",
  headers: { "Authorization": `Bearer ${secret}`, "Content-Type": "application/json" },
  body: JSON.stringify({ task, model, inputs: text }),
});
const job = await reply.json();
if (reply.status === 202) {
  // not finished within the wait: ask again (the Location header names the job)
  const again = await fetch(base + reply.headers.get("location") + "?wait=60", {
    headers: { "Authorization": `Bearer ${secret}` },
  });
  Object.assign(job, await again.json());
} else if (!reply.ok) {
  // an RFC 9457 problem document: pipeq_error names the error, detail says what to do
  console.error(`${job.status} ${job.pipeq_error}: ${job.detail}`);
  process.exit(1);
}
if (job.status !== "SUCCESS") {
  console.error(`job ${job.id} ended ${job.status}: ${JSON.stringify(job.error)}`);
  process.exit(1);
}
console.log(JSON.stringify(job.result));
