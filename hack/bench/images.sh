#!/usr/bin/env bash
# Usage: hack/bench/images.sh [NAME...]     (default: every image)
# Builds the workload images of the benchmark suite into
# $BENCH_IMAGES/NAME/rootfs (default /var/cache/migrun/bench-images), each
# a root filesystem made from Debian packages, used read-only as the lower
# layer of an overlay root filesystem (as Docker uses an image):
#   busybox  busybox-static + one symlink per applet (hack/lib.sh); the idle
#            scenario (`sleep`)
#   cgi      busybox + an httpd CGI script that computes every answer
#            (busybox httpd forks the script per request; one connection
#            per request)
#   pyapp    Debian bookworm + python3 and a small app server computing
#            every answer (dynamic web: HTTP/1.1 keep-alive, a thread per
#            client)
#   dirtier  busybox + tests/programs/dirtier.c compiled statically
#   nginx    Debian bookworm (mmdebstrap, essential variant) + nginx-light,
#            a config on port 8080 and 300 static files of 1-64 KiB
#   redis    Debian bookworm + redis-server (run with debug commands on)
#   cpu      Debian bookworm + sysbench + stress-ng (UnixBench is not in
#            Debian; these two stand in for it)
# Idempotent: an image whose recipe (this script's text and its inputs) did
# not change is kept; a finished image is quick to check. Prints nothing but
# progress on stderr. Environment: BENCH_IMAGES, BENCH_MIRROR (default: the
# host's first Debian URI), BENCH_SUITE (default bookworm).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

IMAGES_DIR=${BENCH_IMAGES:-/var/cache/migrun/bench-images}
SUITE=${BENCH_SUITE:-bookworm}
ALL=(busybox cgi dirtier nginx pyapp redis cpu)

host_mirror() {
    local m
    m="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    [[ -n $m ]] || m="$(awk '$1 == "deb" && $2 ~ /^http/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=${BENCH_MIRROR:-$(host_mirror)}

# recipe_id NAME: what the image is made from (rebuilt when it changes).
recipe_id() {
    {
        echo "$1 $SUITE $MIRROR"
        declare -f "build_$1" debian_rootfs make_busybox_rootfs
        [[ $1 != dirtier ]] || cat "$REPO_ROOT/tests/programs/dirtier.c"
    } | sha256sum | cut -c1-16
}

# debian_rootfs DIR PKG...: bookworm's essential set + PKG, without docs.
debian_rootfs() {
    local dir=$1; shift
    local inc
    inc="$(IFS=,; echo "$*")"
    need_cmd mmdebstrap
    mmdebstrap --mode=root --variant=essential --include="$inc" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$SUITE" "$dir" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" >&2 \
        || die "mmdebstrap of $inc failed"
    # apt's lists and caches are not part of a workload
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/var/log/*
}

build_busybox() { make_busybox_rootfs "$1"; }

build_cgi() {
    local r=$1
    make_busybox_rootfs "$r"
    mkdir -p "$r/www/cgi-bin"
    echo '<html><body>migrun bench: dynamic web (busybox httpd + CGI)</body></html>' >"$r/www/index.html"
    # Each answer is computed: a loop of 300 arithmetic steps in the shell
    # (a few ms of CPU), seeded by the query string and a request counter
    # kept in /tmp (state that must survive the migration).
    cat >"$r/www/cgi-bin/app" <<'CGI'
#!/bin/sh
n=$(cat /tmp/app.count 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >/tmp/app.count
seed=${QUERY_STRING#*=}
case $seed in ''|*[!0-9]*) seed=7 ;; esac
x=$seed i=0
while [ $i -lt 300 ]; do x=$(((x * 1103515245 + 12345) % 2147483648)); i=$((i + 1)); done
printf 'Content-Type: text/plain\r\n\r\n'
printf 'request %s seed %s result %s\n' "$n" "$seed" "$x"
CGI
    chmod 0755 "$r/www/cgi-bin/app"
}

build_dirtier() {
    local r=$1
    make_busybox_rootfs "$r"
    need_cmd gcc
    gcc -O2 -static -o "$r/dirtier" "$REPO_ROOT/tests/programs/dirtier.c" \
        || die "compiling tests/programs/dirtier.c failed (apt-get install gcc libc6-dev)"
}

build_nginx() {
    local r=$1 i
    debian_rootfs "$r" nginx-light
    mkdir -p "$r/srv/www" "$r/var/lib/nginx/body"
    # 300 files of 1 to 64 KiB (fixed sizes and content: the same every build)
    python3 - "$r/srv/www" <<'PY'
import os, random, sys
d = sys.argv[1]
rng = random.Random(42)
names = []
for i in range(300):
    size = rng.choice([1, 2, 4, 8, 16, 32, 64]) * 1024
    name = f"f{i:03d}.html"
    with open(os.path.join(d, name), "w") as f:
        f.write(("<p>migrun static file %d</p>\n" % i) * (size // 28 + 1))
    names.append(name)
with open(os.path.join(d, "index.html"), "w") as f:
    f.write("".join(f'<a href="{n}">{n}</a>\n' for n in names))
PY
    cat >"$r/etc/nginx/bench.conf" <<'NGINX'
# One process (no setuid worker: the container has runc's default capabilities)
daemon off;
user root root;
master_process off;
worker_processes 1;
pid /tmp/nginx.pid;
error_log /tmp/nginx-error.log warn;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path /tmp;
    proxy_temp_path /tmp;
    fastcgi_temp_path /tmp;
    uwsgi_temp_path /tmp;
    scgi_temp_path /tmp;
    server {
        listen 8080 reuseport;
        root /srv/www;
    }
}
NGINX
    i=$(find "$r/srv/www" -type f | wc -l)
    log "nginx: $i files in /srv/www"
}

build_pyapp() {
    local r=$1
    debian_rootfs "$r" python3
    mkdir -p "$r/app"
    # A small app server computing every answer (2000 chained SHA-256 of
    # the request's number, ~2 ms), HTTP/1.1 keep-alive, a thread per client
    cat >"$r/app/server.py" <<'PY'
import hashlib
import http.server
import urllib.parse

COUNT = 0


class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        global COUNT
        COUNT += 1
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        n = q.get("n", ["0"])[0]
        h = hashlib.sha256(n.encode()).digest()
        for _ in range(2000):
            h = hashlib.sha256(h).digest()
        body = f"request {COUNT} n {n} digest {h.hex()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App).serve_forever()
PY
}

build_redis() { debian_rootfs "$1" redis-server; }

build_cpu() { debian_rootfs "$1" sysbench stress-ng; }

build() {
    local name=$1 dir=$IMAGES_DIR/$1 id
    id="$(recipe_id "$name")"
    if [[ -f $dir/recipe && $(cat "$dir/recipe") == "$id" && -d $dir/rootfs ]]; then
        return 0
    fi
    log "building image $name in $dir (recipe $id)"
    rm -rf --one-file-system "$dir.new"
    mkdir -p "$dir.new"
    "build_$name" "$dir.new/rootfs"
    du -sm "$dir.new/rootfs" | awk '{print $1}' >"$dir.new/size_mib"
    echo "$id" >"$dir.new/recipe"
    rm -rf --one-file-system "$dir"
    mv "$dir.new" "$dir"
    log "image $name ready: $(cat "$dir/size_mib") MiB"
}

require_root
mkdir -p "$IMAGES_DIR"
(($#)) || set -- "${ALL[@]}"
for name in "$@"; do
    declare -F "build_$name" >/dev/null || die "unknown image '$name' (${ALL[*]})"
    build "$name"
done
