// A Node.js AI client for the interception tests: Node's own fetch (undici), unmodified,
// trusting oisp's CA through NODE_EXTRA_CA_CERTS. Streams an OpenAI chat completion and
// prints {"text": ..., "chunks": n} as JSON.
//   usage: node node_client.mjs BASE_URL CHUNKS
const [base, chunks] = [process.argv[2], Number(process.argv[3] || 0)];
const response = await fetch(`${base}/v1/chat/completions`, {
  method: "POST",
  headers: { "content-type": "application/json", authorization: "Bearer sk-proj-TESTKEYnode0123456789abcdef" },
  body: JSON.stringify({ model: "gpt-4o-mini", stream: true, stream_chunks: chunks,
                         messages: [{ role: "user", content: "hello from node" }] }),
});
if (!response.ok) throw new Error(`HTTP ${response.status}`);
const decoder = new TextDecoder();
let buffer = "", text = "", events = 0;
for await (const piece of response.body) {
  buffer += decoder.decode(piece, { stream: true });
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const event = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    const data = event.replace(/^data: /, "");
    if (data === "[DONE]") continue;
    const delta = JSON.parse(data).choices?.[0]?.delta?.content;
    if (delta) text += delta;
    events += 1;
  }
}
console.log(JSON.stringify({ text, events }));
