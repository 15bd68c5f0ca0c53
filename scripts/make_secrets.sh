#!/usr/bin/env bash
# Makes the secrets a network-facing metatt-server needs (README "Security"),
# with openssl only:
#   ca.pem / ca.key          a self-signed CA (clients trust ca.pem; keep ca.key offline)
#   server.pem / server.key  the server certificate, signed by the CA
#   tokens.json              the tokens file (--auth_tokens): one admin token
#   admin.token              that token in clear, for metattctl (METATT_TOKEN) or the Python client
#   metrics-password         the /metrics basic-auth password (--metrics_password_file), shared
#                            with Prometheus (basic_auth.password_file in deploy/prometheus)
#
#   scripts/make_secrets.sh deploy/secrets                 # docker compose (deploy/compose.yaml)
#   scripts/make_secrets.sh deploy/k8s/secrets metatt.ml.svc  # kustomize (deploy/k8s), extra DNS names
#
# Every further argument is an extra DNS name (or IP address) of the server
# certificate; localhost, 127.0.0.1, metatt, metatt.default.svc and
# metatt.default.svc.cluster.local are always in it. Refuses to overwrite an
# existing directory's secrets (rotate by making a new directory). The files
# are readable by all (0644) inside a directory only its owner may list and
# write (0711) so that the container user (uid 10001) can read the bind
# mount; restrict further where your platform allows (Kubernetes: the Secret
# volume's defaultMode).
set -euo pipefail
out=${1:?usage: scripts/make_secrets.sh OUT_DIR [extra DNS name or IP ...]}
shift
if [ -e "$out/tokens.json" ] || [ -e "$out/server.key" ]; then
  echo "make_secrets.sh: $out already holds secrets; refusing to overwrite them" >&2
  exit 1
fi
mkdir -p "$out"
chmod 0711 "$out"
umask 022
sans="DNS:localhost,IP:127.0.0.1,DNS:metatt,DNS:metatt.default.svc,DNS:metatt.default.svc.cluster.local"
for n in "$@"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then sans="$sans,IP:$n"; else sans="$sans,DNS:$n"; fi
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$out/ca.key" -out "$out/ca.pem" -days 825 \
  -subj "/CN=metatt CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req "${ec[@]}" -keyout "$out/server.key" -out "$tmp/server.csr" -subj "/CN=metatt" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$sans" > "$tmp/server.ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
  -CAcreateserial -CAserial "$tmp/ca.srl" -out "$out/server.pem" -days 825 \
  -extfile "$tmp/server.ext" 2>/dev/null
token=$(openssl rand -hex 24)
printf '%s\n' "$token" > "$out/admin.token"
sha=$(printf '%s' "$token" | openssl dgst -sha256 -r | cut -d' ' -f1)
printf '{"tokens": [{"tenant": "ops", "role": "admin", "token_sha256": "%s"}]}\n' "$sha" \
  > "$out/tokens.json"
openssl rand -hex 24 > "$out/metrics-password"
chmod 0600 "$out/ca.key"
chmod 0644 "$out/server.key" "$out/admin.token" "$out/metrics-password" "$out/tokens.json" \
  "$out/server.pem" "$out/ca.pem"
# Never commit secrets.
printf '*\n' > "$out/.gitignore"
echo "secrets in $out: ca.pem ca.key server.pem server.key tokens.json admin.token metrics-password"
echo "server certificate names: $sans"
echo "add tenants: printf %s \"\$TOKEN\" | openssl dgst -sha256 -r  -> token_sha256 in tokens.json"
