#!/usr/bin/env bash
# Regenerate the synthetic speech clips in tests/data with espeak-ng + sox.
#
#   tests/data/make_audio.sh [OUT_DIR]      (default: the folder of this script)
#
# Every clip is mono 16-bit PCM WAV. espeak-ng writes 22.05 kHz; sox resamples (-v: very high
# quality, -D: no dither) so the output is byte-identical for a given espeak-ng/sox version
# (made with espeak-ng 1.51, SoX 14.4.2). The spoken texts
# are listed in transcripts.json ("text"); the Whisper tiny.en output is stored next to them
# ("tiny_en") and is refreshed separately (see the "produced_by" field there).
set -euo pipefail
OUT="${1:-$(cd "$(dirname "$0")" && pwd)}"
VOICE="${VOICE:-en-us}"
SPEED="${SPEED:-150}"       # words per minute
command -v espeak-ng >/dev/null || { echo "espeak-ng is required" >&2; exit 1; }
command -v sox >/dev/null || { echo "sox is required" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# say NAME RATE "TEXT": write OUT/NAME.wav at RATE Hz.
say() {
  espeak-ng -v "$VOICE" -s "$SPEED" -w "$TMP/$1.raw.wav" "$3"
  sox -q -D "$TMP/$1.raw.wav" -r "$2" -c 1 -b 16 "$OUT/$1.wav" rate -v
}

S1="The quick brown fox jumps over the lazy dog."
S2="Please call Stella and ask her to bring these things with her from the store."
S3="The weather today is sunny with a light breeze from the west."
S4="I would like to book a table for two at seven o'clock tonight."
S5="Machine learning models can recognize speech in many different languages."
S6="She sells sea shells by the sea shore every summer morning."
S7="The train to Boston leaves from platform number nine at noon."
S8="Remember to water the plants and feed the cat before you leave."
S9="Our meeting has been moved to Thursday afternoon in the large conference room."
S10="Scientists have discovered a new species of frog in the rain forest."

say short_fox    16000 "$S1"
say stella       16000 "$S2"
say weather      16000 "$S3"
say booking      16000 "$S4"
# resampling tests: one 44.1 kHz and one 8 kHz clip
say speech_44k   44100 "$S5"
say speech_8k    8000  "$S6"

# long-form (> 30 s, needs chunking): S7..S10 then S2..S4, 0.4 s of silence between sentences
parts=()
i=0
for s in "$S7" "$S8" "$S9" "$S10" "$S2" "$S3" "$S4"; do
  say "part$i" 16000 "$s"
  mv "$OUT/part$i.wav" "$TMP/part$i.wav"
  sox -q -D -n -r 16000 -c 1 -b 16 "$TMP/gap$i.wav" trim 0 0.4
  parts+=("$TMP/part$i.wav" "$TMP/gap$i.wav")
  i=$((i + 1))
done
sox -q -D "${parts[@]}" "$OUT/long_form.wav"

for f in short_fox stella weather booking speech_44k speech_8k long_form; do
  printf '%-12s %s\n' "$f.wav" "$(soxi -d "$OUT/$f.wav") $(soxi -r "$OUT/$f.wav") Hz"
done
