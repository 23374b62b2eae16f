"""An LCEL chain: question -> FAISS retriever -> DIEKÆ encoders -> SmolLM2 answer.

    python examples/langchain_chain.py "When was the Pelgrin Observatory built?"
"""

import sys
from pathlib import Path

from diekae_rag.integrations.langchain import DiekaeLLM, DiekaeRetriever, create_diekae_chain
from diekae_rag.retrievers import PassageStore

question = " ".join(sys.argv[1:]) or "When was the Pelgrin Observatory built?"
store = PassageStore()
store.sync_folder(Path(__file__).parent / "docs")
chain = create_diekae_chain(DiekaeRetriever(store=store, k=2), DiekaeLLM(max_new_tokens=48))
print(f"Q: {question}\nA: ", end="", flush=True)
sources = []
for chunk in chain.stream(question):
    print(chunk.get("answer", ""), end="", flush=True)
    sources += chunk.get("source_documents", [])
print()
for doc in sources:
    print(f"  source: {doc.metadata['doc_id']} (score {doc.metadata['score']:.3f})")
