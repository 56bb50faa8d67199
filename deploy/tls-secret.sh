#!/usr/bin/env bash
# Make the TLS material for a diffim-dag Dask cluster and print it as a Kubernetes Secret.
#
#   deploy/tls-secret.sh [--namespace NS] [--name diffim-dag-tls] [--days 365] | kubectl apply -f -
#
# A fresh certificate authority signs one certificate that the scheduler, the workers and the client
# (the DaskJob's job pod, or a client pod of a standing cluster) all present.  Dask's TLS is mutual and
# does not check host names: a peer is admitted when its certificate chains to this CA, so only pods that
# mount the Secret can talk to the cluster.  The CA's private key is never written outside a temporary
# folder, which is removed on exit: to rotate, run the script again and restart the cluster.
# Nothing here is committed; the manifests only name the Secret (`diffim-dag-tls`).
# Needs: bash, openssl >= 1.1.1, base64.
set -euo pipefail

name=diffim-dag-tls
namespace=""
days=365
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --namespace|-n) namespace="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "tls-secret.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "tls-secret.sh: openssl is not installed" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077
cd "$work"

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days "$days" \
  -subj "/CN=diffim-dag Dask CA" -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" 2>/dev/null

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
  -subj "/CN=diffim-dag" -keyout tls.key -out tls.csr 2>/dev/null
cat > leaf.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=DNS:diffim-dag-scheduler,DNS:diffim-dag-batch-scheduler,DNS:*.svc.cluster.local,DNS:localhost
EOF
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
  -extfile leaf.ext -out tls.crt 2>/dev/null

b64() { base64 < "$1" | tr -d '\n'; }
echo "apiVersion: v1"
echo "kind: Secret"
echo "type: Opaque"
echo "metadata:"
echo "  name: $name"
[[ -n "$namespace" ]] && echo "  namespace: $namespace"
echo "  labels:"
echo "    app.kubernetes.io/name: diffim-dag"
echo "data:"
echo "  ca.crt: $(b64 ca.crt)"
echo "  tls.crt: $(b64 tls.crt)"
echo "  tls.key: $(b64 tls.key)"
