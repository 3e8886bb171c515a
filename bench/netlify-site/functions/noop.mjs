// The Netlify CLI baseline's function (`netlify functions:serve`): the same status, content type and
// body as bench/site/functions/noop.py.
export const handler = async () => ({
  statusCode: 200,
  headers: { "Content-Type": "text/plain; charset=utf-8" },
  body: "ok",
});
