# Run, test and deploy the gateway. `just` alone lists the recipes.

set shell := ["bash", "-uc"]

bin := ".venv/bin"

# List the recipes
default:
    @{{ quote(just_executable()) }} --justfile {{ quote(justfile()) }} --list --unsorted

# --- Local development ------------------------------------------------------------------------

# Serve the gateway from .venv (settings from the environment and .env; flags: --help)
serve *args:
    {{ bin }}/gateway serve {{ args }}

# Run the simulated backend from .venv (flags: --help)
sim *args:
    {{ bin }}/gateway sim {{ args }}

# Run the gateway in front of the simulator and send it a few requests
demo *args:
    {{ bin }}/gateway demo {{ args }}

# Run the whole test suite (creates .venv first if needed)
test *args:
    bash tests/run.sh {{ args }}

# The fast lane: the suite without the tests marked slow (soak, load, floods, fuzz, llama.cpp, bench runs)
test-fast *args:
    {{ bin }}/python -m pytest -m "not slow" {{ args }}

# Line coverage of the gateway package, its child processes included, over the fast lane (-m "" for all)
coverage *args:
    {{ bin }}/python -m pytest -m "not slow" --cov --cov-report=term {{ args }}

# End-to-end benchmark, direct vs through the gateway (default: the simulator; flags: --help; --floor: Granian alone, --nginx: nginx, in the gateway's place; --scenarios stream-paced-1000: 1,000 paced streams spread over 1 s, each stream's largest gap); --routing: the balancing policies on simulated replicas
bench *args:
    {{ bin }}/python -m bench {{ args }}

# The gateway's CPU, this tree against a git revision, in paired alternating rounds (e.g. --base HEAD~1; --floor: Granian alone in every round too, and each side's CPU above it)
bench-ab *args:
    {{ bin }}/python -m bench.ab {{ args }}

# Micro-benchmarks of the hot-path pieces (pytest-benchmark; add --benchmark-autosave / --benchmark-compare)
bench-micro *args:
    {{ bin }}/python -m pytest bench/micro --benchmark-only -p no:cacheprovider {{ args }}

# Locust load test, headless, 60 s, against :4000 (later flags win, e.g. --host URL -u 64 -t 5m)
load *args:
    mkdir -p bench/results
    {{ bin }}/locust -f bench/locustfile.py --headless -u 32 -r 32 -t 60s --host http://127.0.0.1:4000 --csv bench/results/load --html bench/results/load.html {{ args }}

# Soak test for RELIABILITY.md: mixed traffic and faults through the gateway, memory, fds and connections watched (default 10 minutes; flags: --help)
soak *args:
    {{ bin }}/python -m tools.soak {{ args }}

# ruff check, ruff format --check and mypy --strict over gateway, tests, bench and tools (pyproject.toml's [tool.mypy])
lint:
    {{ bin }}/ruff check .
    {{ bin }}/ruff format --check .
    {{ bin }}/mypy

# --- Docker Compose: write .env from a template, then start a profile ---------------------------

# .env for vLLM on a GPU (`just env-vllm force` overwrites an existing .env)
env-vllm force="": (_env "vllm" "vllm" force)

# .env for SGLang on a GPU (`force` overwrites an existing .env)
env-sglang force="": (_env "sglang" "sglang" force)

# .env for TGI on a GPU (`force` overwrites an existing .env)
env-tgi force="": (_env "tgi" "tgi" force)

# .env for llama.cpp's llama-server with CUDA (`force` overwrites an existing .env)
env-llamacpp force="": (_env "llamacpp" "llamacpp" force)

# .env for Ollama on a GPU (`force` overwrites an existing .env)
env-ollama force="": (_env "ollama" "ollama" force)

# .env for LocalAI with CUDA (`force` overwrites an existing .env)
env-localai force="": (_env "localai" "localai" force)

# .env for the simulated backend, no GPU (`force` overwrites an existing .env)
env-sim force="": (_env "sim" "sim" force)

# .env for LM Studio on the host or any OpenAI-compatible URL (`force` overwrites an existing .env)
env-external force="": (_env "external" "none" force)

[private]
_env name profile force:
    @if [[ -n {{ quote(force) }} && {{ quote(force) }} != force ]]; then echo "usage: just env-{{ name }} [force]" >&2; exit 2; fi
    @if [[ -e .env && {{ quote(force) }} != force ]]; then echo ".env already exists and is kept; to replace it: just env-{{ name }} force" >&2; exit 1; fi
    @cp deploy/env/{{ name }}.env .env
    @echo "wrote .env from deploy/env/{{ name }}.env: set API_KEYS (and the model) in it, then run: just up {{ profile }}"

# Build and start the gateway with one backend, e.g. `just up vllm`; `just up none` starts the gateway alone (LM Studio, external URL)
up kind:
    @[[ -f .env ]] || { echo "no .env: write one first, e.g. just env-{{ kind }}" >&2; exit 1; }
    @if [[ {{ quote(kind) }} == none ]]; then set -x; docker compose up -d --build; \
    elif docker compose config --profiles | grep -qx -- {{ quote(kind) }}; then set -x; docker compose --profile {{ quote(kind) }} up -d --build; \
    else echo "no compose profile '{{ kind }}'; one of: $(docker compose config --profiles | tr '\n' ' ')or none" >&2; exit 1; fi
    @echo "the gateway listens on http://localhost:4000/v1 (just logs, just down)"

# Stop and remove every service of every profile (model cache volumes are kept)
down:
    docker compose --profile '*' down

# Follow the logs of all services, or of one: `just logs vllm`
logs service="":
    docker compose --profile '*' logs --follow --tail 200 {{ service }}
