// Preloaded into the Netlify CLI (NODE_OPTIONS=--require): every server it starts listens on loopback
// only. `netlify functions:serve` has no option for its address and would listen on every interface.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
    if (typeof args[1] !== "string") args.splice(1, 0, "127.0.0.1"); // listen(port[, backlog][, cb])
  } else if (first && typeof first === "object" && first.path === undefined && !first.host) {
    args[0] = { ...first, host: "127.0.0.1" }; // listen({port})
  }
  return listen.apply(this, args);
};
