#!/usr/bin/env bash
# The challenges' METEOR (NLTK) needs WordNet 3.0, which NLTK would download; Debian ships the same database.
# Install it when missing and we are allowed to; surgvqa lays it out for NLTK on first use (surgvqa/evaluation/nltk_data.py).
set -euo pipefail
WORDNET_DIR="${SURGVQA_WORDNET_DIR:-/usr/share/wordnet}"
if [ -f "$WORDNET_DIR/data.noun" ] && [ -f "$WORDNET_DIR/index.sense" ] \
  && { [ -f "$WORDNET_DIR/lexnames" ] || [ -f /usr/share/man/man5/lexnames.5WN.gz ]; }; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing WordNet 3.0 for METEOR (apt-get: wordnet-base wordnet-sense-index)..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index >/dev/null
else
  echo "WordNet 3.0 is missing: install it (Debian: apt-get install wordnet-base wordnet-sense-index) or set SURGVQA_WORDNET_DIR to a WordNet 3.0 dict folder" >&2
  exit 1
fi
