"""Report text -> synthetic chest X-rays: a batched CFG sampler and a resumable dataset generator.

Public API: `inference.sampler.CXRSampler`, `inference.generate.generate(config)`,
`inference.prompts.read_prompts`, `inference.balance.balance_prompts`."""
