"""A stock LlamaIndex query engine whose LLM gets the retrieved chunks through DIEKÆ encoders.

    python examples/llamaindex_query_engine.py "Who founded Calgra?"
"""

import sys
from pathlib import Path

from llama_index.core import SimpleDirectoryReader, VectorStoreIndex

from diekae_rag.integrations.llamaindex import DiekaeEmbedding, DiekaeLLM

question = " ".join(sys.argv[1:]) or "Who founded Calgra?"
docs = SimpleDirectoryReader(str(Path(__file__).parent / "docs")).load_data()
index = VectorStoreIndex.from_documents(docs, embed_model=DiekaeEmbedding())
engine = index.as_query_engine(llm=DiekaeLLM(max_new_tokens=48), similarity_top_k=2)
response = engine.query(question)
print(f"Q: {question}\nA: {response}")
for node in response.source_nodes:
    print(f"  source: {node.node.metadata.get('file_name')} (score {node.score:.3f})")
