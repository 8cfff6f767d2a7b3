#!/usr/bin/env bash
# Make sure ffmpeg and ffprobe are on PATH: use what is there, else install Debian/Ubuntu's package.
set -euo pipefail
if command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "error: ffmpeg/ffprobe not found and apt-get is unavailable; install ffmpeg (>= 5) with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "error: ffmpeg/ffprobe not found; install them as root: apt-get install -y ffmpeg" >&2
    exit 1
  fi
fi
echo "installing ffmpeg with apt-get ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
ffmpeg -version | head -n 1
