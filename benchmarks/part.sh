# Sourced by the GPU scripts: `part NAME COMMAND...` runs COMMAND with a time limit of $LIMIT seconds (default
# 1200; `LIMIT=120 part ...` for one part), logs it to $OUT/NAME.log, prints its exit code and time, and sets
# status=1 when it fails.
part() {
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "${LIMIT:-1200}" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc = 0 ] || status=1
}
