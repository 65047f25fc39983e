#!/usr/bin/env sh
# For clusters without cert-manager: makes a CA and a serving certificate for the webhook's
# Service, stores them in the Secret pointsman-webhook-tls and writes the CA into the
# MutatingWebhookConfiguration. Needs openssl and kubectl; rerun before the cert expires
# (365 days), the webhook reloads the new pair without a restart.
set -eu
NAMESPACE="${NAMESPACE:-pointsman}"
SERVICE="${SERVICE:-pointsman-webhook}"
DAYS="${DAYS:-365}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -days "$DAYS" -subj "/CN=pointsman-webhook-ca" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$SERVICE.$NAMESPACE.svc" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc\n' \
  "$SERVICE" "$SERVICE" "$NAMESPACE" "$SERVICE" "$NAMESPACE" > "$dir/san.ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$DAYS" -extfile "$dir/san.ext" -out "$dir/tls.crt" 2>/dev/null
kubectl -n "$NAMESPACE" create secret tls pointsman-webhook-tls \
  --cert="$dir/tls.crt" --key="$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
ca="$(base64 < "$dir/ca.crt" | tr -d '\n')"
kubectl patch mutatingwebhookconfiguration pointsman-sidecar-injector --type=json \
  -p "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca\"}]"
echo "webhook certificate for $SERVICE.$NAMESPACE.svc installed; CA written to the webhook config"
