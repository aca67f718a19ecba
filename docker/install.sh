#!/usr/bin/env bash
# The one install script of megatron_hybrid: CPU dev/CI environments (`make venv`, CI) and the GPU image (Dockerfile)
# both go through here, so there is a single place that decides which torch build a machine gets.
#
# Usage: docker/install.sh cpu|gpu [--no-dev] [--kernels-only] [--check] [-h|--help]
#
#   cpu   CPU-only environment. With VENV set, creates (or reuses) that virtual environment with $PYTHON; without it,
#         installs into $PYTHON itself. Installs torch==$TORCH_VERSION (a CPU build; the script refuses any
#         resolution that would pull CUDA packages), pins it with a pip constraint so no dependency can replace it,
#         then `pip install -e .[dev]` (`--no-dev`: plain `-e .`).
#   gpu   Machine or image that already has a CUDA build of torch (e.g. the pytorch/pytorch devel base image) and
#         nvcc. Pins the installed torch, builds causal-conv1d and mamba-ssm from source against it
#         (--no-build-isolation, *_FORCE_BUILD=TRUE, TORCH_CUDA_ARCH_LIST), then installs the package with [gpu,serve].
#         `--kernels-only` stops after the kernels (lets the Dockerfile cache them in their own layer).
#   --check  print what was detected and what would be done, change nothing.
#
# Environment (all optional):
#   PYTHON              interpreter to use or to create the venv from (default: python3; must be >= 3.10)
#   VENV                cpu: virtual environment directory to create/reuse
#   TORCH_VERSION       cpu: torch release to install (default 2.13.0)
#   TORCH_INDEX_URL     cpu: index to take torch from, e.g. https://download.pytorch.org/whl/cpu where the default
#                       index would serve a CUDA build (Linux x86_64 PyPI does); default: pip's configuration
#   EXTRAS              extras to install (default: cpu "dev", gpu "gpu,serve")
#   EDITABLE            1 (default) installs the package with -e; 0 installs a regular copy
#   PERSIST_PIN         1 writes the torch pin into <prefix>/pip.conf so later `pip install`s keep it
#                       (default: 1 inside a venv, 0 otherwise; the Dockerfile sets 1)
#   CAUSAL_CONV1D_SPEC  gpu: pip requirement or path for causal-conv1d (default causal-conv1d==1.7.0)
#   MAMBA_SSM_SPEC      gpu: pip requirement or path for mamba-ssm (default mamba-ssm==2.3.2.post1)
#   GPU_KERNELS         gpu: which kernels to build (default "causal-conv1d mamba-ssm")
#   TORCH_CUDA_ARCH_LIST gpu: default "8.0;9.0" (A100, H100/H200). Note: causal-conv1d 1.7.0 and mamba-ssm 2.3.2
#                       pass their own -gencode list (sm_75..sm_120 with CUDA 12.8), which takes precedence in
#                       torch's BuildExtension, so for them this mostly documents intent; it applies to other builds
#   MAX_JOBS            gpu: parallel nvcc jobs (default: half the cores, at most 16; nvcc needs ~4 GB a job)
#   FORCE_REBUILD       gpu: 1 rebuilds the kernels even when a matching build is installed
#
# Idempotent: a second run finds torch and the kernels in place and only re-checks the package install.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

log() { printf '[install.sh] %s\n' "$*"; }
die() { printf '[install.sh] ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '5,/^# Idempotent/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

MODE=""
DEV=1
KERNELS_ONLY=0
CHECK_ONLY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        cpu|gpu) [[ -z "${MODE}" ]] || die "mode given twice ('${MODE}' and '$1')"; MODE="$1" ;;
        --no-dev) DEV=0 ;;
        --kernels-only) KERNELS_ONLY=1 ;;
        --check) CHECK_ONLY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see docker/install.sh --help)" ;;
    esac
    shift
done
[[ -n "${MODE}" ]] || die "give a mode: cpu or gpu (see docker/install.sh --help)"
[[ "${MODE}" == gpu || "${KERNELS_ONLY}" == 0 ]] || die "--kernels-only only applies to gpu mode"

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EDITABLE="${EDITABLE:-1}"
CAUSAL_CONV1D_SPEC="${CAUSAL_CONV1D_SPEC:-causal-conv1d==1.7.0}"
MAMBA_SSM_SPEC="${MAMBA_SSM_SPEC:-mamba-ssm==2.3.2.post1}"
GPU_KERNELS="${GPU_KERNELS:-causal-conv1d mamba-ssm}"

TMP_DIR="$(mktemp -d)"
trap 'rm -rf "${TMP_DIR}"' EXIT

# ---------------------------------------------------------------------------------------------------------------------
# Interpreter
# ---------------------------------------------------------------------------------------------------------------------
check_python_version() {  # $1: interpreter
    "$1" - <<'EOF' || die "$1 is Python $("$1" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); megatron_hybrid needs Python >= 3.10 (set PYTHON=/path/to/python3.10+)"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
}

command -v "${PYTHON}" >/dev/null 2>&1 || die "python interpreter '${PYTHON}' not found (set PYTHON=...)"
check_python_version "${PYTHON}"

if [[ "${MODE}" == cpu && -n "${VENV:-}" ]]; then
    if [[ -x "${VENV}/bin/python" ]]; then
        log "reusing virtual environment ${VENV}"
    elif [[ "${CHECK_ONLY}" == 1 ]]; then
        log "would create virtual environment ${VENV} with ${PYTHON}"
    else
        log "creating virtual environment ${VENV} with $(command -v "${PYTHON}")"
        "${PYTHON}" -m venv "${VENV}"
    fi
    if [[ -x "${VENV}/bin/python" ]]; then
        PY="${VENV}/bin/python"
        check_python_version "${PY}"
    else
        PY="${PYTHON}"
    fi
else
    PY="${PYTHON}"
fi
PY_PREFIX="$("${PY}" -c 'import sys; print(sys.prefix)')"
IN_VENV="$("${PY}" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')"
PERSIST_PIN="${PERSIST_PIN:-${IN_VENV}}"
log "mode=${MODE} python=${PY} ($("${PY}" -c 'import platform; print(platform.python_version())'), prefix ${PY_PREFIX})"

# pip, minus the "Location 'file:///...' is ignored" warnings that this machine's extra-index configuration prints.
pip_() { "${PY}" -m pip "$@" 2> >(grep -v --line-buffered "^WARNING: Location 'file:" >&2); }

"${PY}" -m pip --version >/dev/null 2>&1 || die "${PY} has no pip (install python3-pip / python3-venv)"
# --dry-run --report need pip >= 22.2; upgrade old bundled pips once.
if ! "${PY}" - <<'EOF'
import sys
from importlib.metadata import version
major, minor = (int(p) for p in version("pip").split(".")[:2])
sys.exit(0 if (major, minor) >= (22, 2) else 1)
EOF
then
    [[ "${CHECK_ONLY}" == 1 ]] || { log "upgrading pip (need >= 22.2)"; pip_ install --quiet --upgrade "pip>=23"; }
fi

installed_version() {  # $1: distribution name -> version or empty
    "${PY}" -c "import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass" "$1"
}

gpu_visible() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# Write the constraint file ($1 = lines) and, when asked, make it permanent for this interpreter's pip.
CONSTRAINTS="${TMP_DIR}/constraints.txt"
write_constraints() {
    printf '%s\n' "$1" >"${CONSTRAINTS}"
    if [[ "${PERSIST_PIN}" == 1 && "${CHECK_ONLY}" == 0 ]]; then
        local keep="${PY_PREFIX}/megatron_hybrid-constraints.txt"
        printf '# Written by docker/install.sh: keeps this environment'"'"'s torch build; edit to change it.\n%s\n' \
            "$1" >"${keep}"
        if [[ ! -e "${PY_PREFIX}/pip.conf" ]] || grep -q 'docker/install.sh' "${PY_PREFIX}/pip.conf"; then
            printf '# Written by docker/install.sh\n[install]\nconstraint = %s\n' "${keep}" >"${PY_PREFIX}/pip.conf"
            log "torch pin kept for later installs: ${PY_PREFIX}/pip.conf -> ${keep}"
        else
            log "note: ${PY_PREFIX}/pip.conf exists and is not ours; the torch pin applies to this run only"
        fi
    fi
}

install_package() {  # $1: extras (may be empty); further arguments go to pip
    local extras="$1" target="${REPO_ROOT}"
    shift
    [[ -z "${extras}" ]] || target="${REPO_ROOT}[${extras}]"
    local args=("$@")
    [[ "${EDITABLE}" != 1 ]] || args+=(-e)
    log "installing megatron_hybrid: pip install ${args[*]} ${target}"
    pip_ install --quiet -c "${CONSTRAINTS}" "${args[@]}" "${target}"
}

# ---------------------------------------------------------------------------------------------------------------------
# cpu
# ---------------------------------------------------------------------------------------------------------------------
cpu_install_torch() {
    local have
    have="$(installed_version torch)"
    if [[ "${have}" == "${TORCH_VERSION}" || "${have}" == "${TORCH_VERSION}+cpu" ]]; then
        local cuda
        cuda="$("${PY}" -W ignore -c 'import torch; print(torch.version.cuda or "")')"
        [[ -z "${cuda}" ]] || die "installed torch ${have} is a CUDA ${cuda} build; cpu mode wants the CPU build (remove it, or use a fresh VENV)"
        log "torch ${have} (CPU build) already installed"
        return
    fi
    [[ -z "${have}" ]] || log "torch ${have} is installed; replacing it with ${TORCH_VERSION} (CPU)"

    local index=()
    [[ -z "${TORCH_INDEX_URL:-}" ]] || index=(--index-url "${TORCH_INDEX_URL}")
    # Resolve first without installing: a CUDA build announces itself by pulling nvidia-* wheels (and triton). Refuse
    # it before gigabytes are downloaded.
    log "resolving torch==${TORCH_VERSION} (dry run)"
    pip_ install --quiet --dry-run --ignore-installed --report "${TMP_DIR}/torch-report.json" \
        -c "${CONSTRAINTS}" ${index[@]+"${index[@]}"} "torch==${TORCH_VERSION}" \
        || die "pip could not resolve torch==${TORCH_VERSION}; set TORCH_INDEX_URL to an index that has its CPU build"
    local verdict
    verdict="$("${PY}" - "${TMP_DIR}/torch-report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
items = report.get("install", [])
cuda = sorted(i["metadata"]["name"] for i in items
              if i["metadata"]["name"].lower().startswith(("nvidia-", "cuda-")) or i["metadata"]["name"].lower() == "triton")
torch = [i for i in items if i["metadata"]["name"].lower() == "torch"]
where = torch[0]["download_info"]["url"] if torch else "?"
print(("CUDA " + ",".join(cuda)) if cuda else "CPU", where)
EOF
)"
    case "${verdict}" in
        CPU*) log "torch==${TORCH_VERSION} resolves to a CPU build (${verdict#CPU })" ;;
        *) die "torch==${TORCH_VERSION} would come as a CUDA build (${verdict%% *} deps: ${verdict#CUDA }).
  Refusing to download it on a CPU machine. Point TORCH_INDEX_URL at a CPU index
  (e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu) or put the CPU wheel in pip's find-links." ;;
    esac
    [[ "${CHECK_ONLY}" == 1 ]] && return
    log "installing torch==${TORCH_VERSION} (CPU)"
    pip_ install --quiet -c "${CONSTRAINTS}" ${index[@]+"${index[@]}"} "torch==${TORCH_VERSION}"
    local cuda
    cuda="$("${PY}" -W ignore -c 'import torch; print(torch.version.cuda or "")')"
    [[ -z "${cuda}" ]] || die "installed torch reports CUDA ${cuda}; expected a CPU build"
}

run_cpu() {
    if gpu_visible; then
        log "note: a GPU is visible, but cpu mode installs the CPU torch build (use 'gpu' mode for the CUDA kernels)"
    fi
    # The pin: exactly this release, any local tag (+cpu). Every later pip call of this script passes it.
    write_constraints "torch==${TORCH_VERSION}"
    cpu_install_torch
    local extras="${EXTRAS-dev}"
    [[ "${DEV}" == 1 ]] || extras="${EXTRAS-}"
    if [[ "${CHECK_ONLY}" == 1 ]]; then
        log "would install megatron_hybrid with extras '[${extras}]'"
        return
    fi
    install_package "${extras}"
    "${PY}" -c 'import torch, megatron_hybrid; assert torch.version.cuda is None' \
        || die "post-install check failed: megatron_hybrid does not import, or torch is not the CPU build"
    log "done: $("${PY}" -c 'import torch; print("torch", torch.__version__)'), megatron_hybrid installed in ${PY_PREFIX}"
}

# ---------------------------------------------------------------------------------------------------------------------
# gpu
# ---------------------------------------------------------------------------------------------------------------------
kernel_ok() {  # $1: distribution, $2: CUDA extension module, $3: wanted version (may be empty)
    local have
    have="$(installed_version "$1")"
    [[ -n "${have}" ]] || return 1
    [[ -z "$3" || "${have}" == "$3" ]] || return 1
    "${PY}" -c "import torch, $2" >/dev/null 2>&1
}

spec_version() {  # "name==1.2.3" -> 1.2.3 ; anything else -> empty
    [[ "$1" == *==* ]] && printf '%s' "${1##*==}" || true
}

build_kernel() {  # $1: distribution, $2: extension module, $3: pip spec
    local wanted
    wanted="$(spec_version "$3")"
    if [[ "${FORCE_REBUILD:-0}" != 1 ]] && kernel_ok "$1" "$2" "${wanted}"; then
        log "$1 $(installed_version "$1") already built (imports $2); skipping (FORCE_REBUILD=1 to rebuild)"
        return
    fi
    if [[ "${CHECK_ONLY}" == 1 ]]; then
        log "would build $3 from source"
        return
    fi
    log "building $3 from source (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}, MAX_JOBS=${MAX_JOBS}); this takes a while"
    local start=${SECONDS} force=()
    [[ "${FORCE_REBUILD:-0}" != 1 ]] || force=(--force-reinstall --no-deps)
    pip_ install -c "${CONSTRAINTS}" --no-build-isolation --no-cache-dir --no-binary "$1" \
        ${force[@]+"${force[@]}"} "$3"
    "${PY}" -c "import torch, $2" || die "$1 installed but its CUDA extension $2 does not import"
    log "$1 built in $((SECONDS - start)) s"
}

run_gpu() {
    local torch_info
    torch_info="$("${PY}" -c 'import torch; print(torch.__version__, torch.version.cuda or "none")' 2>/dev/null)" \
        || die "gpu mode needs a CUDA build of torch already installed in ${PY} (use a CUDA PyTorch base image such as
  pytorch/pytorch:*-cuda*-devel); this script never installs torch in gpu mode"
    local torch_version="${torch_info%% *}" torch_cuda="${torch_info##* }" torch_dist
    [[ "${torch_cuda}" != none ]] || die "torch ${torch_version} in ${PY} is a CPU build; gpu mode needs a CUDA build"
    log "torch ${torch_version} built for CUDA ${torch_cuda}"
    # Pin the version pip sees, which may lack the local tag of torch.__version__ (PyPI's CUDA wheels: 2.11.0 vs
    # 2.11.0+cu130); a constraint with a tag the installed distribution lacks can never be satisfied.
    torch_dist="$(installed_version torch)"
    [[ -n "${torch_dist}" ]] || die "torch imports but pip sees no torch distribution in ${PY}; cannot pin it"

    local nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    [[ -x "${nvcc}" ]] || nvcc="$(command -v nvcc || true)"
    [[ -n "${nvcc}" ]] || die "nvcc not found (set CUDA_HOME, or use a *-devel CUDA image); it is needed to build the kernels"
    log "nvcc: ${nvcc} ($("${nvcc}" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
    if gpu_visible; then
        log "GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
    else
        log "no GPU visible (normal inside 'docker build'); building for the listed architectures"
    fi

    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
    export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
    if [[ -z "${MAX_JOBS:-}" ]]; then
        local cores
        cores="$(nproc)"
        MAX_JOBS=$(( cores / 2 )); (( MAX_JOBS >= 1 )) || MAX_JOBS=1; (( MAX_JOBS <= 16 )) || MAX_JOBS=16
    fi
    export MAX_JOBS

    # Pin what the base image ships so that no kernel dependency can swap the CUDA torch (or its triton) out.
    local pins="torch==${torch_dist}" triton_version
    triton_version="$(installed_version triton)"
    [[ -z "${triton_version}" ]] || pins+=$'\n'"triton==${triton_version}"
    write_constraints "${pins}"

    if [[ "${CHECK_ONLY}" == 0 ]]; then
        # --no-build-isolation builds against this environment, so its build tools must be here.
        pip_ install --quiet -c "${CONSTRAINTS}" "setuptools>=64" wheel ninja packaging
    fi
    local k
    for k in ${GPU_KERNELS}; do
        case "${k}" in
            causal-conv1d) build_kernel causal-conv1d causal_conv1d_cuda "${CAUSAL_CONV1D_SPEC}" ;;
            mamba-ssm) build_kernel mamba-ssm selective_scan_cuda "${MAMBA_SSM_SPEC}" ;;
            *) die "unknown kernel '${k}' in GPU_KERNELS (known: causal-conv1d mamba-ssm)" ;;
        esac
    done

    if [[ "${KERNELS_ONLY}" == 1 ]]; then
        log "done (--kernels-only): kernels in place, package not installed"
        return
    fi
    local extras="${EXTRAS-gpu,serve}"
    if [[ "${CHECK_ONLY}" == 1 ]]; then
        log "would install megatron_hybrid with extras '[${extras}]'"
        return
    fi
    # No build isolation: an isolated build could otherwise try to build the [gpu] kernels again without torch.
    install_package "${extras}" --no-build-isolation
    "${PY}" -c 'import torch, megatron_hybrid' || die "post-install check failed: megatron_hybrid does not import"
    log "done: torch ${torch_version} (CUDA ${torch_cuda}), kernels [${GPU_KERNELS}], megatron_hybrid[${extras}]"
}

case "${MODE}" in
    cpu) run_cpu ;;
    gpu) run_gpu ;;
esac
