# Helpers shared by tpu_vm.sh and gpu_multinode.sh (sourced; $PROG is the calling script).
# Builtins only, so that --help and --dry-run work with nothing on PATH.

# Prints its standard input (a here-document) with builtins only, so that --help and
# --print-sbatch work with nothing on PATH.
emit() {
  local text
  IFS= read -r -d '' text || true
  printf '%s' "$text"
}

# One line on stderr and exit status 2, like a usage error of pmsn_jax.main.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# Prints its arguments as one line that bash reads back as the same words.
quote_cmd() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}
