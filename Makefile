# Every target does one thing; CI calls these same targets.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSTEM_PYTHON ?= python3
# Processes `make test` and `make check` spread the tests over; under `make test` each starts a Kafka broker of its
# own unless KAFKA_BOOTSTRAP_SERVERS names one. 1 runs them in this process, in file order.
TEST_WORKERS ?= 2
WORKERS := $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal)

.PHONY: install system-packages run test check lint bench keygen kafka-up kafka-down clean

install: $(STAMP)  ## virtualenv with the pinned runtime and test dependencies, and the client package (`pusher`)

# The client is installed editable: the service imports its wire types, and a change to its code is live at once;
# only a change to its packaging (client/pyproject.toml) needs installing again.
$(STAMP): requirements.txt requirements-dev.txt client/pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -e ./client
	touch $(STAMP)

system-packages:  ## Debian packages the tests and the benchmark need (Java, Maven, Chromium, Redis, Mosquitto, wrk), when missing
	scripts/system-packages.sh

run:  ## start a local Kafka unless KAFKA_BOOTSTRAP_SERVERS is set, then the service; a line per step
	@$(MAKE) -s -q $(STAMP) || { echo "Installing the virtualenv and the pinned dependencies into $(VENV) (once)"; \
	  $(MAKE) -s install; }
	@if [ -z "$$KAFKA_BOOTSTRAP_SERVERS" ]; then \
	  bootstrap=$$($(SYSTEM_PYTHON) scripts/kafka_local.py up) || exit 1; \
	  echo "Local Kafka at $$bootstrap (stop it with: make kafka-down)"; \
	  export KAFKA_BOOTSTRAP_SERVERS=$$bootstrap KAFKA_CREATE_TOPIC=$${KAFKA_CREATE_TOPIC:-true}; \
	else \
	  echo "Kafka at $$KAFKA_BOOTSTRAP_SERVERS (KAFKA_BOOTSTRAP_SERVERS)"; \
	fi; \
	scheme=$${API_TLS_CERTFILE:+https}; url=$${scheme:-http}://$${API_HOST:-127.0.0.1}:$${API_PORT:-8000}; \
	tls="$${API_TLS_CERTFILE:+--cacert YOUR-CA.pem }$${API_TLS_CLIENT_CAFILE:+--cert CLIENT.pem --key CLIENT.key }"; \
	echo "Starting the service: Preservarium Pusher on $$url   API docs: $$url/docs"; \
	echo "Try: curl $$tls-X POST $$url/api/v1/commands -H 'Content-Type: application/json' \\"; \
	echo "       -d '{\"device_id\": \"efento_device_001\", \"command_type\": \"config_update\", \"payload\": {\"measurement_interval\": 600}, \"protocol\": \"coap\"}'"; \
	exec $(PY) -m pusher

test: install system-packages  ## the whole suite, against a real Kafka broker it starts itself
	$(PY) -m pytest $(WORKERS)

# tests/conftest.py marks `integration` every test that starts a server or the service as a process.
check: lint  ## the edit loop: lint, then every test that needs no server (no Kafka, Mosquitto, Redis, Chromium)
	$(PY) -m pytest -q -m "not integration" $(WORKERS)

# The service and the seed plan's app each run from a virtualenv of their own under .cache (bench/run.py builds them).
bench: $(STAMP) system-packages  ## wrk against the service and its ceilings, and the goals as measured; writes bench/RESULTS.md
	$(PY) bench/run.py $(BENCH_ARGS)

lint: install  ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

keygen: install  ## print a new API key; its entry goes into KEYS_FILE=… when given, else is printed (ID=… SCOPES=…)
	@$(PY) -m pusher keygen $${ID:-key-$$(date +%s)} $${SCOPES:-commands:write,commands:read} \
	  $${KEYS_FILE:+--keys-file "$$KEYS_FILE"}

kafka-up:  ## start the local Kafka broker (127.0.0.1:9092, or KAFKA_LOCAL_PORT)
	@$(SYSTEM_PYTHON) scripts/kafka_local.py up

kafka-down:  ## stop the local Kafka broker started by kafka-up / run
	@$(SYSTEM_PYTHON) scripts/kafka_local.py down

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
