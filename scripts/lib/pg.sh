# Sourced by scripts/test and scripts/bench: `start_private_pg DIR` starts a
# private PostgreSQL cluster, new each run, in DIR (or, when the postgres
# user cannot reach DIR or its socket path would be too long, in a private
# temp dir): a Unix socket in that directory (PostgreSQL cannot bind port 0)
# and a free TCP port on 127.0.0.1 with TLS (a CA and certificate made here)
# and SCRAM passwords. initdb and pg_ctl refuse root: as root they run as
# the postgres user. It exports OXID_TEST_PG, OXID_TEST_PG_CA and
# OXID_TEST_PG_PASSWORD (the tests and `oxid-bench ha` read them) and stops
# the cluster when the calling script exits. Needs Debian's postgresql
# (initdb and pg_ctl under /usr/lib/postgresql/<version>/bin), openssl and
# python3.
pg_as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_private_pg() {
    pg_dir=$1
    pg_bin=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -1)
    if [ -z "$pg_bin" ]; then
        echo "error: PostgreSQL is not installed (apt-get install -y postgresql)" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$pg_dir")"
    # The postgres user must reach the directory, and a socket path is at most
    # 107 bytes: else the cluster goes in a private temp dir.
    if ! pg_as_postgres test -x "$(dirname "$pg_dir")" || [ ${#pg_dir} -gt 80 ]; then
        pg_dir=$(mktemp -d /tmp/oxid-pg-test.XXXXXX)
    fi
    if [ -f "$pg_dir/data/postmaster.pid" ]; then
        pg_as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$pg_dir"
    mkdir -p "$pg_dir/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=oxid test PostgreSQL CA" -keyout "$pg_dir/tls/ca.key" -out "$pg_dir/tls/ca.pem" \
        2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout "$pg_dir/tls/server.key" -out "$pg_dir/tls/server.csr" 2>/dev/null
    openssl x509 -req -in "$pg_dir/tls/server.csr" -CA "$pg_dir/tls/ca.pem" -CAkey "$pg_dir/tls/ca.key" \
        -CAcreateserial -days 30 -out "$pg_dir/tls/server.pem" \
        -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n') 2>/dev/null
    local port password
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$password" >"$pg_dir/password"
    chmod 600 "$pg_dir/tls/server.key"
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$pg_dir"; fi
    pg_as_postgres "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 --pwfile="$pg_dir/password" --no-sync >"$pg_dir/initdb.log"
    pg_as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w start -o \
        "-k $pg_dir -p $port -c listen_addresses=127.0.0.1 -c max_connections=400 -c ssl=on \
        -c ssl_cert_file=$pg_dir/tls/server.pem -c ssl_key_file=$pg_dir/tls/server.key" >/dev/null
    trap 'pg_as_postgres "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast stop >/dev/null' EXIT
    export OXID_TEST_PG="host=$pg_dir port=$port user=postgres"
    export OXID_TEST_PG_CA=$pg_dir/tls/ca.pem OXID_TEST_PG_PASSWORD=$password
    echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}'): $OXID_TEST_PG" >&2
}
