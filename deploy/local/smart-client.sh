#!/usr/bin/env bash
# A minimal SMART Backend Services client made of openssl and python3, for trying the proxy by hand.
#
#   deploy/local/smart-client.sh keygen DIR            RS384 key pair in DIR (key.pem, jwks.json); prints the JWKS
#   deploy/local/smart-client.sh assertion CLIENT_ID KID KEY.pem TOKEN_URL
#                                                      prints a signed client assertion (RS384, valid 4 minutes)
#   deploy/local/smart-client.sh token CLIENT_ID KID KEY.pem TOKEN_URL [SCOPE]
#                                                      requests an access token; prints the JSON answer
set -euo pipefail

b64url() { python3 -c 'import base64,sys; print(base64.urlsafe_b64encode(sys.stdin.buffer.read()).rstrip(b"=").decode())'; }

keygen() {
  local dir="$1"
  mkdir -p "$dir"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$dir/key.pem" 2> /dev/null
  chmod 600 "$dir/key.pem"
  local n kid
  n=$(openssl rsa -in "$dir/key.pem" -noout -modulus | cut -d= -f2 | python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().strip()))' | b64url)
  kid=$(printf '%s' "$n" | openssl dgst -sha256 -binary | b64url | cut -c1-16)
  printf '{"keys":[{"kty":"RSA","kid":"%s","alg":"RS384","use":"sig","n":"%s","e":"AQAB"}]}\n' "$kid" "$n" > "$dir/jwks.json"
  cat "$dir/jwks.json"
}

assertion() {
  local client_id="$1" kid="$2" key="$3" aud="$4" now header claims input
  now=$(date +%s)
  header=$(printf '{"alg":"RS384","typ":"JWT","kid":"%s"}' "$kid" | b64url)
  claims=$(printf '{"iss":"%s","sub":"%s","aud":"%s","exp":%d,"iat":%d,"jti":"%s"}' \
    "$client_id" "$client_id" "$aud" $((now + 240)) "$now" "$(python3 -c 'import uuid; print(uuid.uuid4())')" | b64url)
  input="$header.$claims"
  printf '%s.%s\n' "$input" "$(printf '%s' "$input" | openssl dgst -sha384 -sign "$key" -binary | b64url)"
}

token() {
  local scope="${5:-system/*.rs}"
  curl -sS -X POST "$4" \
    --data-urlencode grant_type=client_credentials \
    --data-urlencode "scope=$scope" \
    --data-urlencode client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer \
    --data-urlencode "client_assertion=$(assertion "$1" "$2" "$3" "$4")"
  echo
}

case "${1:-}" in
  keygen) shift; keygen "$@" ;;
  assertion) shift; assertion "$@" ;;
  token) shift; token "$@" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
