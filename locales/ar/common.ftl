default-name = صديقي
common-fallback = عذرًا، لم أفهم ذلك. أرسل /start لرؤية القائمة مرة أخرى.
