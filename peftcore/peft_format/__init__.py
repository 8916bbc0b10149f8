"""peft's adapter files, translated: ``adapter_config.json`` fields and tensor names, per method."""
