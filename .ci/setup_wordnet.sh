#!/usr/bin/env bash
# Assemble NLTK's WordNet 3.0 corpus from Debian packages, for full (exact + stem + synonym) METEOR offline.
#
#   .ci/setup_wordnet.sh [NLTK_DATA_DIR]      (default: $NLTK_DATA, else ~/nltk_data)
#
# Debian's `wordnet-base` and `wordnet-sense-index` put the WordNet 3.0 database files in /usr/share/wordnet.
# NLTK's WordNetCorpusReader reads the same files from $NLTK_DATA/corpora/wordnet/, plus a `lexnames` file
# that Debian does not ship; it is written here (45 lexicographer files: index, name, syntactic category).
# Idempotent: packages are installed only when missing, files are copied only when they differ.
# Afterwards `NLTK_DATA=<dir> python -c "from nltk.corpus import wordnet; print(wordnet.synsets('dog'))"` works.
set -euo pipefail

TARGET_ROOT="${1:-${NLTK_DATA:-$HOME/nltk_data}}"
WN_SRC=/usr/share/wordnet
WN_DST="$TARGET_ROOT/corpora/wordnet"
PACKAGES=(wordnet-base wordnet-sense-index)
# The files NLTK's reader opens (nltk/corpus/reader/wordnet.py, WordNetCorpusReader._FILES), minus lexnames.
FILES=(cntlist.rev index.sense index.adj index.adv index.noun index.verb
       data.adj data.adv data.noun data.verb adj.exc adv.exc noun.exc verb.exc)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup_wordnet: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  echo "setup_wordnet: installing ${missing[*]}"
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
fi

mkdir -p "$WN_DST"
for f in "${FILES[@]}"; do
  [[ -f "$WN_SRC/$f" ]] || { echo "setup_wordnet: $WN_SRC/$f is missing after install" >&2; exit 1; }
  cmp -s "$WN_SRC/$f" "$WN_DST/$f" || cp "$WN_SRC/$f" "$WN_DST/$f"
done

# WordNet 3.0 lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES=(
  adj.all:3 adj.pert:3 adv.all:4 noun.Tops:1 noun.act:1 noun.animal:1 noun.artifact:1 noun.attribute:1
  noun.body:1 noun.cognition:1 noun.communication:1 noun.event:1 noun.feeling:1 noun.food:1 noun.group:1
  noun.location:1 noun.motive:1 noun.object:1 noun.person:1 noun.phenomenon:1 noun.plant:1 noun.possession:1
  noun.process:1 noun.quantity:1 noun.relation:1 noun.shape:1 noun.state:1 noun.substance:1 noun.time:1
  verb.body:2 verb.change:2 verb.cognition:2 verb.communication:2 verb.competition:2 verb.consumption:2
  verb.contact:2 verb.creation:2 verb.emotion:2 verb.motion:2 verb.perception:2 verb.possession:2
  verb.social:2 verb.stative:2 verb.weather:2 adj.ppl:3
)
tmp="$(mktemp)"
for i in "${!LEXNAMES[@]}"; do
  printf '%02d\t%s\t%s\n' "$i" "${LEXNAMES[$i]%%:*}" "${LEXNAMES[$i]##*:}" >>"$tmp"
done
[[ $(wc -l <"$tmp") -eq 45 ]] || { echo "setup_wordnet: lexnames must have 45 lines" >&2; rm -f "$tmp"; exit 1; }
if cmp -s "$tmp" "$WN_DST/lexnames"; then rm -f "$tmp"; else mv "$tmp" "$WN_DST/lexnames"; chmod 644 "$WN_DST/lexnames"; fi

echo "setup_wordnet: WordNet 3.0 ready in $WN_DST (set NLTK_DATA=$TARGET_ROOT if that is not on NLTK's path)"
