"""Adapters: reading adapter folders, attaching LoRA/DoRA to a base, fast DoRA, loading an adapter on its base for
inference, merge, DoRA normalisation and import from NVlabs/torchtune."""
