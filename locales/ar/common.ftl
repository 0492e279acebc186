default-name = صديقي
common-fallback = عذرًا، لم أفهم ذلك. أرسل /start لرؤية القائمة مرة أخرى.
handoff-waiting = شكرًا! سيرد عليك أحد أعضاء فريقنا هنا قريبًا.
