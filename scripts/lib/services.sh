# shellcheck shell=bash
#
# Throwaway redis-server and clickhouse-server instances for scripts/test.
#
# Sourced by scripts/test; expects the caller to have `set -euo pipefail`.
# Every instance listens on 127.0.0.1 only, on free ports chosen at start-up
# (never the default 6379/8123/9000/9009), and keeps all of its state in
# $SVC_TMP, so the distribution's own services (running or not) are ignored.
#
# Public functions:
#   svc_ensure_installed      install missing packages via apt-get (root only)
#   svc_start_all             start redis + clickhouse, wait until they answer
#   svc_stop_all              stop everything svc_start_all started (idempotent)
# Globals set: SVC_TMP, REDIS_BIN, CLICKHOUSE_BIN, REDIS_PORT,
#   CLICKHOUSE_HTTP_PORT, CLICKHOUSE_TCP_PORT, CLICKHOUSE_INTERSERVER_PORT.

SVC_TIMEOUT=${METERD_TEST_SERVICE_TIMEOUT:-60}
SVC_PIDS=()
SVC_NAMES=()

svc_log() { printf '[scripts/test] %s\n' "$*" >&2; }
svc_die() {
  svc_log "ERROR: $*"
  exit 1
}

# svc_find_bin NAME: print an absolute path to executable NAME, or return 1.
# Symlinks are deliberately not resolved (upstream ClickHouse packages ship
# clickhouse-server as a symlink to a multi-call binary that looks at argv[0]).
# /usr/sbin is searched too because it is not on a non-root user's PATH.
svc_find_bin() {
  local name=$1 p d
  p=$(type -P "$name" 2>/dev/null || true)
  if [[ -n $p ]]; then
    [[ $p == /* ]] || p="$PWD/$p"
    printf '%s\n' "$p"
    return 0
  fi
  for d in /usr/sbin /usr/bin /usr/local/sbin /usr/local/bin /sbin /bin; do
    if [[ -x $d/$name && ! -d $d/$name ]]; then
      printf '%s\n' "$d/$name"
      return 0
    fi
  done
  return 1
}

# Install redis-server, clickhouse-server (and the clients used for the
# readiness checks) if they are missing. Only root can do that.
svc_ensure_installed() {
  local missing=()
  svc_find_bin redis-server >/dev/null || missing+=(redis-server)
  svc_find_bin redis-cli >/dev/null || missing+=(redis-tools)
  svc_find_bin clickhouse-server >/dev/null || missing+=(clickhouse-server)
  svc_find_bin curl >/dev/null || missing+=(curl)
  ((${#missing[@]} == 0)) && return 0

  if ((EUID != 0)); then
    svc_log "ERROR: missing: ${missing[*]}"
    svc_log "Install them first (as root):"
    svc_log "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
    svc_log "or run with METERD_TEST_SKIP_SERVICES=1 to skip the service-backed setup."
    exit 1
  fi
  type -P apt-get >/dev/null || svc_die "missing ${missing[*]} and no apt-get to install them"

  svc_log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # `apt-get update` only when needed: no package lists yet, or install failed.
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
  elif ! apt-get install -y -q "${missing[@]}"; then
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
  fi

  svc_find_bin redis-server >/dev/null || svc_die "redis-server still missing after apt-get install"
  svc_find_bin clickhouse-server >/dev/null || svc_die "clickhouse-server still missing after apt-get install"
}

# svc_free_ports N: print N distinct free TCP ports on 127.0.0.1, one a line.
svc_free_ports() {
  local n=$1
  if type -P python3 >/dev/null; then
    python3 - "$n" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
PY
    return
  fi
  # Fallback: probe random ports below the ephemeral range for a listener.
  local chosen=() p tries=0
  while ((${#chosen[@]} < n)); do
    ((++tries < 1000)) || svc_die "could not find $n free ports"
    p=$((20000 + RANDOM % 12000))
    [[ " ${chosen[*]} " == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      chosen+=("$p")
    fi
  done
  printf '%s\n' "${chosen[@]}"
}

# svc_alive PID: true while PID runs (a zombie child counts as dead).
svc_alive() {
  local pid=$1 stat
  if [[ -r /proc/$pid/stat ]]; then
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
  else
    kill -0 "$pid" 2>/dev/null
  fi
}

svc_register() {
  SVC_NAMES+=("$1")
  SVC_PIDS+=("$2")
}

# Print the tail of every file given that exists.
svc_show_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    svc_log "----- last lines of $f -----"
    tail -n 40 "$f" >&2 || true
  done
}

# ---------------------------------------------------------------- redis ----

svc_redis_ping() {
  local out
  out=$(timeout 5 "$REDIS_CLI" -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) || return 1
  [[ $out == PONG ]]
}

svc_start_redis() {
  local dir=$SVC_TMP/redis
  mkdir -p "$dir"
  REDIS_PORT=$(svc_free_ports 1)
  "$REDIS_BIN" \
    --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode yes \
    --dir "$dir" --save '' --appendonly no \
    --daemonize no --logfile "$dir/redis.log" \
    >"$dir/stdout.log" 2>&1 </dev/null &
  REDIS_PID=$!
  svc_register redis-server "$REDIS_PID"
}

# ----------------------------------------------------------- clickhouse ----

svc_write_clickhouse_config() {
  local dir=$1
  mkdir -p "$dir/data/tmp" "$dir/data/user_files" "$dir/data/format_schemas" "$dir/log"
  cat >"$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CLICKHOUSE_HTTP_PORT</http_port>
    <tcp_port>$CLICKHOUSE_TCP_PORT</tcp_port>
    <interserver_http_port>$CLICKHOUSE_INTERSERVER_PORT</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$dir/data/</path>
    <tmp_path>$dir/data/tmp/</tmp_path>
    <user_files_path>$dir/data/user_files/</user_files_path>
    <format_schema_path>$dir/data/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
</yandex>
XML
  cat >"$dir/users.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>::1</ip>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
XML
}

svc_clickhouse_ping() {
  local out
  out=$(curl -fsS --max-time 5 "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/ping" 2>/dev/null) || return 1
  [[ $out == Ok.* ]] || return 1
  out=$(curl -fsS --max-time 5 --data-binary 'SELECT 1' "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/" 2>/dev/null) || return 1
  [[ $out == 1 ]]
}

svc_start_clickhouse() {
  local dir=$SVC_TMP/clickhouse ports
  mkdir -p "$dir"
  ports=$(svc_free_ports 3)
  {
    read -r CLICKHOUSE_HTTP_PORT
    read -r CLICKHOUSE_TCP_PORT
    read -r CLICKHOUSE_INTERSERVER_PORT
  } <<<"$ports"
  svc_write_clickhouse_config "$dir"
  # Run from the state dir: the server writes config-preprocessed.xml etc.
  # next to its config, and relative paths resolve there.
  (cd "$dir" && exec "$CLICKHOUSE_BIN" --config-file="$dir/config.xml") \
    >"$dir/log/stdout.log" 2>&1 </dev/null &
  CLICKHOUSE_PID=$!
  svc_register clickhouse-server "$CLICKHOUSE_PID"
}

# svc_wait NAME PID CHECK_FN LOG...: poll CHECK_FN until it succeeds; fail
# (showing the logs) if PID exits or SVC_TIMEOUT seconds pass.
svc_wait() {
  local name=$1 pid=$2 check=$3
  shift 3
  local deadline=$((SECONDS + SVC_TIMEOUT))
  while ! "$check"; do
    if ! svc_alive "$pid"; then
      svc_log "ERROR: $name (pid $pid) exited during start-up"
      svc_show_logs "$@"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      svc_log "ERROR: $name (pid $pid) did not answer within ${SVC_TIMEOUT}s"
      svc_show_logs "$@"
      return 1
    fi
    sleep 0.2
  done
}

svc_start_all() {
  REDIS_BIN=$(svc_find_bin redis-server) || svc_die "redis-server not found"
  REDIS_CLI=$(svc_find_bin redis-cli) || svc_die "redis-cli not found (package redis-tools)"
  CLICKHOUSE_BIN=$(svc_find_bin clickhouse-server) || svc_die "clickhouse-server not found"
  type -P curl >/dev/null || svc_die "curl not found"

  # Start both first, then wait: the two start-ups overlap.
  svc_start_redis
  svc_start_clickhouse
  svc_wait redis-server "$REDIS_PID" svc_redis_ping \
    "$SVC_TMP/redis/redis.log" "$SVC_TMP/redis/stdout.log" || exit 1
  svc_wait clickhouse-server "$CLICKHOUSE_PID" svc_clickhouse_ping \
    "$SVC_TMP/clickhouse/log/clickhouse-server.err.log" \
    "$SVC_TMP/clickhouse/log/clickhouse-server.log" \
    "$SVC_TMP/clickhouse/log/stdout.log" || exit 1
}

# Stop every server we started: SIGTERM, up to 30 s grace, then SIGKILL.
svc_stop_all() {
  local i pid name deadline
  for i in "${!SVC_PIDS[@]}"; do
    kill -TERM "${SVC_PIDS[$i]}" 2>/dev/null || true
  done
  for i in "${!SVC_PIDS[@]}"; do
    pid=${SVC_PIDS[$i]}
    name=${SVC_NAMES[$i]}
    deadline=$((SECONDS + 30))
    while svc_alive "$pid" && ((SECONDS < deadline)); do
      sleep 0.1
    done
    if svc_alive "$pid"; then
      svc_log "$name (pid $pid) still running after 30s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  SVC_PIDS=()
  SVC_NAMES=()
}
