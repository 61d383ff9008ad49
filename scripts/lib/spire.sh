# Sourced by scripts/bench and scripts/interop-spire: `build_spire` builds
# SPIRE from the Go module proxy into target/spire/bin (never committed),
# once; a later call with the binaries in place returns at once.
SPIRE_VERSION=v1.13.3
build_spire() {
    local bin=target/spire/bin
    # `--version` prints e.g. "1.13.3-dev-unk" for a build from the proxy.
    if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ] &&
        [[ "$("$bin/spire-server" --version 2>&1)" == "${SPIRE_VERSION#v}"* ]] &&
        [[ "$("$bin/spire-agent" --version 2>&1)" == "${SPIRE_VERSION#v}"* ]]; then
        echo "SPIRE $SPIRE_VERSION already built in $bin" >&2
        return
    fi
    if ! command -v go >/dev/null; then
        echo "error: building SPIRE $SPIRE_VERSION needs Go 1.25.3 or later (go is not on PATH; install it from https://go.dev/dl/ and put its bin/ on PATH)" >&2
        exit 1
    fi
    echo "building SPIRE $SPIRE_VERSION into target/spire (about 6 minutes the first time)" >&2
    local root
    root=$(pwd)/target
    mkdir -p target/spire/src "$bin"
    (
        cd target/spire/src
        export GOMODCACHE=$root/go/mod GOCACHE=$root/go/cache GOFLAGS=-modcacherw \
            GOTOOLCHAIN=local GOBIN=$root/spire/bin
        [ -f go.mod ] || go mod init oxid.bench/spire
        go get -tool "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION"
        go get -tool "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION"
        go install github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
    )
}

