# Shared by the GPU bench scripts: seconds since a `date +%s.%N` stamp, and starting a server
# and waiting until it answers /health (its pid in SERVER; killed on exit).
elapsed() { python3 -c 'import sys, time; print(round(time.time() - float(sys.argv[1]), 1))' "$1"; }

# start_server LOG PORT ARGS... — runs `pruneserve serve ARGS --port PORT` into LOG.
start_server() {
  local log=$1 port=$2
  shift 2
  "$BIN/pruneserve" serve "$@" --port "$port" > "$log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
    kill -0 $SERVER 2>/dev/null || { tail -20 "$log"; return 1; }
    sleep 1
  done
  return 1
}

stop_server() { kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; }

# start_cache_server MODE ARGS... — start_server into $OUT/server-MODE.log on $PORT with ARGS, plus
# --enable-prefix-caching when MODE is `on`, plus $SERVE_ARGS (another model or device).
start_cache_server() {
  local mode=$1 flag=()
  shift
  [ "$mode" = on ] && flag=(--enable-prefix-caching)
  start_server "$OUT/server-$mode.log" "$PORT" "$@" "${flag[@]}" ${SERVE_ARGS:-}
}
