"""What engines do to a Pyro program, in one place (the role of NumPyro's ``infer/util.py``).

Tracing under given values, the log joint with ``mask``, ``scale`` and ``obs_mask`` applied once,
plate nesting guessed from plates and sites' batch shapes, constrain / unconstrain with the log-det
Jacobian, batching over an outer draw/chain/particle plate with a per-draw fallback, pointwise
log-likelihood, predictive draws, minibatch scaling and graph capture. An engine that needs one of
these calls it here; it never writes its own copy.
"""
