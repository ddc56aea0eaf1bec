"""The flight recorder's parts, pure torch (the meter itself is ``meters.flight.FlightMeter``):

- ``ring``: the last steps' rows on the device, written in place, read back only at an event, a save or the end;
- ``events``: the events, typed (``Event``), and each in words;
- ``sample``: which elements of each weight its update norm is measured on (1 % of them by default);
- ``persist``: the window's JSON file beside the logs, written atomically and read back;
- ``lifeline``: what keeps the window when the process ends without an exception the front end sees (SIGTERM, a
  fork, the process's exit).
"""
