cart-reminder = { $first_name }، تركت في سلتك: { $cart_updated_items }. ما زالت بانتظارك.
cart-btn-checkout = الذهاب إلى سلتي
cart-code = ما زلت تفكر؟ إليك الرمز { $cart_code } لخصم 10% على سلتك، صالح لمدة 48 ساعة.
cart-last-call = سلتك محفوظة: { $cart_updated_items }. أكمل طلبك متى كنت مستعدًا.
viewed-reminder = هل ما زلت تفكر في { $product_viewed_title }؟ ها هو مرة أخرى: { $product_viewed_url }
birthday-code = عيد ميلاد سعيد يا { $first_name }! 🎂 هديتك: الرمز { $birthday_code } لخصم 20%، صالح لمدة أسبوع.
birthday-wishes = عيد ميلاد سعيد يا { $first_name }! 🎂 نتمنى لك عامًا رائعًا.
