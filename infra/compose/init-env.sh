#!/usr/bin/env bash
# Create infra/compose/.env and secrets/ray_auth_token with fresh random credentials.
# Run once before `docker compose up`; it never overwrites an existing .env.
set -euo pipefail
cd "$(dirname "$0")"
umask 077

if [ -e .env ]; then
  echo "infra/compose/.env exists; delete it (and secrets/) to create new credentials" >&2
  exit 0
fi

rand() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

mkdir -p secrets
token="$(rand)"
printf '%s\n' "$token" > secrets/ray_auth_token
{
  echo "MINIO_ROOT_USER=gram-admin"
  echo "MINIO_ROOT_PASSWORD=$(rand)"
  echo "GRAM_S3_ACCESS_KEY=gram"
  echo "GRAM_S3_SECRET_KEY=$(rand)"
  echo "POSTGRES_PASSWORD=$(rand)"
  echo "RAY_AUTH_TOKEN=$token"
} > .env

echo "wrote infra/compose/.env and infra/compose/secrets/ray_auth_token (mode 600)"
echo "clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$PWD/secrets/ray_auth_token"
