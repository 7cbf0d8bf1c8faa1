#!/bin/sh
# nginx in the foreground on 127.0.0.1:PORT, with its config, pid and logs under STATE
# (Tron's per-service directory, {state}). Usage: nginx.sh STATE PORT
set -eu
state="$1"; port="$2"
mkdir -p "$state/logs" "$state/tmp"
cat > "$state/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $state/nginx.pid;
error_log stderr notice;
events { worker_connections 64; }
http {
  access_log $state/logs/access.log;
  client_body_temp_path $state/tmp/body;
  proxy_temp_path $state/tmp/proxy;
  fastcgi_temp_path $state/tmp/fastcgi;
  uwsgi_temp_path $state/tmp/uwsgi;
  scgi_temp_path $state/tmp/scgi;
  server {
    listen 127.0.0.1:$port;
    location / { return 200 "ok\n"; }
  }
}
CONF
exec nginx -c "$state/nginx.conf" -p "$state"
