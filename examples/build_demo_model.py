"""Build the demo's small Llama (random weights, local BPE tokenizer) at the given directory."""

import sys

from gptq_plugins.testing import build_tiny_model

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "demo_out/model"
    path = build_tiny_model(out, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, vocab_size=1024, max_position_embeddings=1024)
    print(f"built a 4-block Llama (hidden 256) with a local tokenizer at {path}")
