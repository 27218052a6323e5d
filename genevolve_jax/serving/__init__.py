"""The HTTP servers genevolve runs, and the guards they share.

- :mod:`~genevolve_jax.serving.policy_server` (`genevolve serve`): the JaxEngine behind SGLang's native
  API subset and OpenAI chat completions; :mod:`~genevolve_jax.serving.policy_schema` validates its
  requests;
- :mod:`~genevolve_jax.serving.render_service` (`genevolve render-server`): the renderers behind the
  original Qwen-Image-Edit service's JSON contract, one worker per device;
- :mod:`~genevolve_jax.serving.guards`: what both put in front of every route (bearer token, body
  cap, admission bound, strict JSON, image bombs, OpenAI's error shape).

Their clients live with what they stand in for: SGLangEngine in rollout/, HTTPRenderer in render/.
Nothing is imported here, so the package costs nothing until a server is built.
"""
