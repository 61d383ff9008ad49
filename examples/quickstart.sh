#!/usr/bin/env bash
# oxid quickstart: one command, no root, nothing touched outside a work dir.
#
# Builds oxid, starts a server (embedded store) and an agent, registers two
# workloads by their executables, and runs an mTLS server and client that
# get their identities from the agent's Workload API, then a JWT-SVID call
# to an HTTP service that validates the token offline. Certificates are
# short-lived here (20 s) so a rotation shows within a minute, while both
# programs keep running. A third program with no entry is refused.
# Everything stops on exit or Ctrl-C; any failed step exits non-zero.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${OXID_QUICKSTART_DIR:-$(mktemp -d -t oxid-quickstart.XXXXXX)}"
mkdir -p "$WORK"
chmod 700 "$WORK"
PIDS=()

# Bold headings on a terminal only: a log file or CI gets plain text.
if [ -t 1 ]; then BOLD=$'\033[1m'; PLAIN=$'\033[0m'; else BOLD=; PLAIN=; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
fail() { printf '\nquickstart FAILED: %s\n(logs in %s)\n' "$*" "$WORK" >&2; exit 1; }
cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until FILE contains PATTERN (an event in a log), or fails.
wait_for() {
    local file=$1 pattern=$2 what=$3
    for _ in $(seq 1 300); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "timed out waiting for $what (see $file)"
}

# CI runs the demo on the debug build it already has (OXID_QUICKSTART_PROFILE=dev).
PROFILE="${OXID_QUICKSTART_PROFILE:-release}"
say "Building oxid ($PROFILE)"
if [ "$PROFILE" = release ]; then
    echo "A first release build takes several minutes on two cores (later runs reuse it)."
fi
start=$(date +%s)
cargo build --profile "$PROFILE" --manifest-path "$ROOT/Cargo.toml" \
    -p oxid-server -p oxid-agent -p oxid-examples
echo "built in $(( $(date +%s) - start ))s"
if [ "$PROFILE" = dev ]; then BIN="$ROOT/target/debug"; else BIN="$ROOT/target/$PROFILE"; fi
demo_start=$(date +%s)

say "Starting the server (trust domain example.org, data in $WORK/server)"
cat > "$WORK/server.toml" <<TOML
trust_domain = "example.org"
[ca]
ttl = "10m"
x509_svid_ttl = "20s"
agent_svid_ttl = "1m"
jwt_svid_ttl = "1m"
TOML
"$BIN/oxid-server" run --config "$WORK/server.toml" --data-dir "$WORK/server" \
    --socket-path "$WORK/server-run/admin.sock" --bind-address 127.0.0.1:0 \
    > "$WORK/server.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/server.log" "oxid-server ready" "the server"
ADDR=$(grep -o 'agent_api=[0-9.:]*' "$WORK/server.log" | head -1 | cut -d= -f2)
ADMIN=(--socket-path "$WORK/server-run/admin.sock")
echo "agent API on $ADDR"

say "Creating a join token and starting the agent"
TOKEN_JSON=$("$BIN/oxid-server" token generate "${ADMIN[@]}" --output json)
TOKEN=$(echo "$TOKEN_JSON" | sed 's/.*"token":"\([0-9a-f]*\)".*/\1/')
TOKEN_ID=$(echo "$TOKEN_JSON" | sed 's/.*"id":"\([0-9a-f]*\)".*/\1/')
AGENT_ID="spiffe://example.org/oxid/agent/join_token/$TOKEN_ID"
"$BIN/oxid-server" bundle show "${ADMIN[@]}" > "$WORK/bundle.pem"
"$BIN/oxid-agent" run --server-address "$ADDR" --trust-bundle "$WORK/bundle.pem" \
    --join-token "$TOKEN" --data-dir "$WORK/agent" --socket-path "$WORK/agent-run/api.sock" \
    > "$WORK/agent.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/agent.log" "serving the Workload API" "the agent"
echo "agent attested as $AGENT_ID"
export SPIFFE_ENDPOINT_SOCKET="unix://$WORK/agent-run/api.sock"

say "Registering the two workloads by executable and uid"
# An executable alone would match that program run by any user (and code
# injected into it); the uid ties each entry to this user's processes.
ME="unix:uid:$(id -u)"
SERVER_BIN="$BIN/mtls-server"
CLIENT_BIN="$BIN/mtls-client"
CLIENT_SHA=$(sha256sum "$CLIENT_BIN" | cut -d' ' -f1)
"$BIN/oxid-server" entry create "${ADMIN[@]}" --spiffe-id spiffe://example.org/demo/server \
    --parent-id "$AGENT_ID" --selector "unix:path:$SERVER_BIN" --selector "$ME" > /dev/null
echo "spiffe://example.org/demo/server  <-  unix:path:$SERVER_BIN + $ME"
"$BIN/oxid-server" entry create "${ADMIN[@]}" --spiffe-id spiffe://example.org/demo/client \
    --parent-id "$AGENT_ID" --selector "unix:sha256:$CLIENT_SHA" --selector "$ME" > /dev/null
echo "spiffe://example.org/demo/client  <-  unix:sha256:$CLIENT_SHA + $ME"

say "Starting the mTLS server (it accepts only spiffe://example.org/demo/client)"
"$SERVER_BIN" --listen 127.0.0.1:0 --allow spiffe://example.org/demo/client \
    > "$WORK/mtls-server.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/mtls-server.log" "listening on" "the mTLS server"
cat "$WORK/mtls-server.log"
MTLS_ADDR=$(grep -o 'listening on [0-9.:]*' "$WORK/mtls-server.log" | head -1 | cut -d' ' -f3)

say "Running the mTLS client for ~40 s: watch the serials change (rotation)"
"$CLIENT_BIN" --connect "$MTLS_ADDR" --server-id spiffe://example.org/demo/server \
    --count 20 --interval 2 | tee "$WORK/mtls-client.log"
serials=$(grep -o 'my serial [0-9a-f]*' "$WORK/mtls-client.log" | sort -u | wc -l)
server_serials=$(grep -o 'my certificate serial [0-9a-f]*' "$WORK/mtls-server.log" | sort -u | wc -l)
[ "$serials" -ge 2 ] || fail "no client certificate rotation was observed"
[ "$server_serials" -ge 2 ] || fail "no server certificate rotation was observed"
grep -q "long-lived connection still up" "$WORK/mtls-client.log" || fail "the long-lived connection broke"
echo
echo "server side:"
tail -n 5 "$WORK/mtls-server.log"

say "JWT-SVIDs: an HTTP service checks bearer tokens offline"
"$BIN/oxid-server" entry create "${ADMIN[@]}" --spiffe-id spiffe://example.org/demo/api \
    --parent-id "$AGENT_ID" --selector "unix:path:$BIN/jwt-server" --selector "$ME" > /dev/null
"$BIN/oxid-server" entry create "${ADMIN[@]}" --spiffe-id spiffe://example.org/demo/caller \
    --parent-id "$AGENT_ID" --selector "unix:path:$BIN/jwt-client" --selector "$ME" > /dev/null
"$BIN/jwt-server" --listen 127.0.0.1:0 --audience spiffe://example.org/demo/api \
    --allow spiffe://example.org/demo/caller > "$WORK/jwt-server.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/jwt-server.log" "listening on" "the JWT service"
JWT_ADDR=$(grep -o 'listening on [0-9.:]*' "$WORK/jwt-server.log" | head -1 | cut -d' ' -f3)
"$BIN/jwt-client" --url "http://$JWT_ADDR/" --audience spiffe://example.org/demo/api \
    || fail "the JWT-SVID call was refused"
echo "Next, a token minted for another audience: the service must refuse it (expected)."
if "$BIN/jwt-client" --url "http://$JWT_ADDR/" --audience spiffe://example.org/someone-else; then
    fail "a token for another audience was accepted"
fi
tail -n 2 "$WORK/jwt-server.log"

say "A third program with no entry asks for an identity"
echo "It has no entry, so the agent must refuse it (expected):"
if "$BIN/whoami"; then
    fail "a process without an entry got an identity"
fi

say "Done"
echo "client certificates seen: $serials, server certificates seen: $server_serials (rotated under running processes)"
echo "demo time: $(( $(date +%s) - demo_start ))s; logs kept in $WORK"
