"""Model building blocks: norms, rotary embedding, attention, gated delta net, MoE, linear layers."""
